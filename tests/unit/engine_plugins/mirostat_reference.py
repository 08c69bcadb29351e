"""An independent float64 Mirostat v2 (llama.cpp's sort-and-cut form) and a fake persistent
batch that drives the V1 processor the way vLLM's InputBatch does."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

from engine_plugins.mirostat import Mirostat


@dataclass
class ReferenceStep:
    kept: set[int]
    token: int
    surprise: float
    mu_next: float


def reference_step(z: np.ndarray, mu: float, tau: float, eta: float,
                   gumbel: np.ndarray) -> ReferenceStep:
    """llama.cpp mirostat v2 in float64: sort, cut at the first candidate whose surprise
    exceeds mu (keeping at least one), renormalise, sample, observe, update."""
    z = z.astype(np.float64)
    finite = np.isfinite(z)
    top = z[finite].max()
    logq = np.full_like(z, -np.inf)
    logq[finite] = z[finite] - (top + math.log(np.exp(z[finite] - top).sum()))
    order = np.argsort(-z, kind="stable")
    surprise = -logq / math.log(2.0)
    cut = 0
    while cut < len(order) and surprise[order[cut]] <= mu:
        cut += 1
    kept = order[:max(cut, 1)]
    logq_kept = logq[kept] - np.log(np.exp(logq[kept]).sum())
    choice = int(np.argmax(logq_kept + gumbel[kept]))
    token = int(kept[choice])
    s = float(-logq_kept[choice] / math.log(2.0))
    return ReferenceStep(set(int(k) for k in kept), token, s, mu - eta * (s - tau))


def params(tau: float | None = None, eta: float | None = None, temperature: float = 1.0,
           seed: int | None = None) -> SamplingParams:
    extra: dict[str, Any] = {}
    if tau is not None:
        extra["mirostat_target"] = tau
    if eta is not None:
        extra["mirostat_lr"] = eta
    return SamplingParams(temperature=temperature, seed=seed, extra_args=extra or None)


class InjectedMirostat(Mirostat):
    """The processor with its Gumbel noise supplied by the test."""

    next_noise: torch.Tensor

    def noise(self, rows: np.ndarray, positions: np.ndarray, vocab: int) -> torch.Tensor:
        return self.next_noise


def make_processor(max_rows: int = 16) -> InjectedMirostat:
    config = SimpleNamespace(scheduler_config=SimpleNamespace(max_num_seqs=max_rows))
    return InjectedMirostat(config, torch.device("cpu"), False)  # type: ignore[arg-type]


@dataclass
class FakeBatch:
    """Rows of the persistent batch, as vLLM lays them out, with the edits of one step."""

    rows: list[str | None]
    outputs: dict[str, list[int]] = field(default_factory=dict)
    removed: list[int] = field(default_factory=list)
    added: list[tuple[int, SamplingParams, list[int], list[int]]] = field(default_factory=list)
    moved: list[tuple[int, int, MoveDirectionality]] = field(default_factory=list)

    def add(self, request: str, sampling: SamplingParams) -> int:
        index = self.rows.index(None) if None in self.rows else len(self.rows)
        if index == len(self.rows):
            self.rows.append(None)
        self.rows[index] = request
        self.outputs[request] = []
        self.added.append((index, sampling, [1, 2, 3], self.outputs[request]))
        return index

    def remove(self, index: int) -> None:
        self.rows[index] = None
        self.removed.append(index)

    def swap(self, a: int, b: int) -> None:
        self.rows[a], self.rows[b] = self.rows[b], self.rows[a]
        self.moved.append((a, b, MoveDirectionality.SWAP))

    def move(self, a: int, b: int) -> None:
        """UNIDIRECTIONAL a -> b into an empty row b, as condense does."""
        self.rows[b], self.rows[a] = self.rows[a], None
        self.moved.append((a, b, MoveDirectionality.UNIDIRECTIONAL))

    def condense(self) -> None:
        while None in self.rows and any(r is not None for r in
                                        self.rows[self.rows.index(None):]):
            hole = self.rows.index(None)
            last = max(i for i, r in enumerate(self.rows) if r is not None)
            self.move(last, hole)
        while self.rows and self.rows[-1] is None:
            self.rows.pop()

    def flush(self) -> BatchUpdate | None:
        if not (self.removed or self.added or self.moved):
            return None
        update = BatchUpdate(batch_size=len(self.rows), removed=list(self.removed),
                             added=list(self.added), moved=list(self.moved))
        self.removed, self.added, self.moved = [], [], []
        return update
