"""Mirostat v2 (llama.cpp semantics) as a V1 logits processor.

Per step and row, on temperature-scaled logits z:
    keep the tokens whose surprise -log2 p(z) is at most mu (the argmax always stays),
    renormalise, sample x, observe s = -log2 p_kept(x), and mu_next = mu - eta * (s - tau).

Design ("sample, force, commit later", because vLLM may discard or override a sample): the
processor samples x itself and rewrites the row to one-hot, so vLLM's own sampler emits x and
every other truncation is neutralised. mu_next is only *pending*: it is committed at the next
step if and only if the token really emitted at that position is x. Discarded chunked-prefill
samples, batch moves and anything that overrides the sample therefore never corrupt mu.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from engine_plugins.xargs import parse_mirostat, validate_mirostat

if TYPE_CHECKING:
    from vllm import SamplingParams
    from vllm.config import VllmConfig

LN2 = math.log(2.0)
_SEED_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads (seed, position) pairs


def truncated_step(
    z: torch.Tensor, mu: torch.Tensor, eta: torch.Tensor, tau: torch.Tensor,
    gumbel: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One vectorised Mirostat v2 step over rows of scaled logits z [B, V].

    Returns (token x [B], observed surprise s in bits [B], mu_next [B]). `gumbel` is the
    standard Gumbel noise [B, V] that picks the sample (argmax of log p + noise).
    """
    logq = torch.log_softmax(z, dim=-1)
    keep = (-logq / LN2) <= mu.unsqueeze(1)
    keep.scatter_(1, z.argmax(dim=-1, keepdim=True), True)  # never an empty set
    logq_kept = logq.masked_fill(~keep, -math.inf)
    logq_kept = logq_kept - torch.logsumexp(logq_kept, dim=-1, keepdim=True)
    x = (logq_kept + gumbel).argmax(dim=-1)
    s = -logq_kept.gather(1, x.unsqueeze(1)).squeeze(1) / LN2
    return x, s, mu - eta * (s - tau)


def gumbel_noise(uniform: torch.Tensor) -> torch.Tensor:
    tiny = torch.finfo(uniform.dtype).tiny
    return -torch.log(-torch.log(uniform.clamp_(min=tiny, max=1.0 - 1e-7)))


def position_seed(seed: int, position: int) -> int:
    """A generator seed for (request seed, output position): reproducible per request and
    independent of which steps were discarded or how the batch was laid out."""
    return ((seed * _SEED_MIX) ^ (position + 1) * 0xBF58476D1CE4E5B9) & 0x7FFF_FFFF_FFFF_FFFF


class Mirostat(LogitsProcessor):  # type: ignore[misc]
    """Per-row state lives in fixed-size tensors indexed by batch row and follows every
    add, remove, swap and move of the persistent batch under one permutation."""

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool):
        rows = vllm_config.scheduler_config.max_num_seqs
        self.device = device
        f32 = {"dtype": torch.float32, "device": device}
        self.mu = torch.zeros(rows, **f32)
        self.mu_pending = torch.zeros(rows, **f32)
        self.surprise_pending = torch.zeros(rows, **f32)  # s of the pending sample, for tests
        self.tau = torch.zeros(rows, **f32)
        self.eta = torch.zeros(rows, **f32)
        self.x_pending = torch.full((rows,), -1, dtype=torch.int64, device=device)
        # Host-side row metadata (O(rows) integers, never vocabulary-sized).
        self.active = np.zeros(rows, dtype=bool)
        self.pos_pending = np.full(rows, -1, dtype=np.int64)
        self.seed = np.full(rows, -1, dtype=np.int64)  # -1: unseeded
        self.outputs: list[list[int] | None] = [None] * rows
        self.generator = torch.Generator(device=device)
        self.generator.seed()

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        validate_mirostat(sampling_params)

    def is_argmax_invariant(self) -> bool:
        # True: the argmax is never truncated away and greedy rows are untouched. It places
        # the processor after temperature and before top-k/top-p, where Mirostat belongs.
        return True

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self._clear(index)
        staged: list[tuple[int, float, float]] = []
        for index, params, _prompt, output in batch_update.added:
            args = parse_mirostat(params.extra_args, max(params.temperature, 1e-6))
            self._clear(index)
            if args is None or params.temperature <= 0.0:
                continue
            self.active[index] = True
            self.outputs[index] = output
            self.seed[index] = -1 if params.seed is None else params.seed
            staged.append((index, args.tau, args.eta))
        if staged:
            index_t = torch.tensor([s[0] for s in staged], device=self.device)
            tau = torch.tensor([s[1] for s in staged], dtype=torch.float32, device=self.device)
            eta = torch.tensor([s[2] for s in staged], dtype=torch.float32, device=self.device)
            self.tau[index_t] = tau
            self.eta[index_t] = eta
            self.mu[index_t] = 2.0 * tau
            self.mu_pending[index_t] = 2.0 * tau
            self.x_pending[index_t] = -1
        if batch_update.moved:
            self._move(batch_update.moved)

    def _clear(self, index: int) -> None:
        self.active[index] = False
        self.outputs[index] = None
        self.pos_pending[index] = -1

    def _move(self, moves: object) -> None:
        perm = np.arange(len(self.active))
        for a, b, direction in moves:  # type: ignore[attr-defined]
            if direction == MoveDirectionality.SWAP:
                perm[a], perm[b] = perm[b], perm[a]
            else:
                perm[b] = perm[a]
        emptied = [a for a, _b, d in moves if d == MoveDirectionality.UNIDIRECTIONAL]  # type: ignore[attr-defined]
        self.active = self.active[perm]
        self.pos_pending = self.pos_pending[perm]
        self.seed = self.seed[perm]
        self.outputs = [self.outputs[i] for i in perm]
        perm_t = torch.from_numpy(perm).to(self.device, non_blocking=True)
        for name in ("mu", "mu_pending", "surprise_pending", "tau", "eta", "x_pending"):
            setattr(self, name, getattr(self, name)[perm_t])
        targets = {b for _a, b, _d in moves}  # type: ignore[attr-defined]
        for a in emptied:
            if a not in targets:
                self._clear(a)

    def noise(self, rows: np.ndarray, positions: np.ndarray, vocab: int) -> torch.Tensor:
        """Gumbel noise per row: (seed, position)-keyed for seeded rows, a batched draw
        for the rest. Tests replace this to inject the reference's noise."""
        uniform = torch.rand((len(rows), vocab), generator=self.generator, device=self.device)
        for k, row in enumerate(rows):
            if self.seed[row] >= 0:
                g = torch.Generator(device=self.device)
                g.manual_seed(position_seed(int(self.seed[row]), int(positions[k])))
                uniform[k] = torch.rand(vocab, generator=g, device=self.device)
        return gumbel_noise(uniform)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        batch, vocab = logits.shape
        rows = np.flatnonzero(self.active[:batch])
        if rows.size == 0:
            return logits
        # Host: output lengths and the token emitted where each row sampled last time.
        lengths = np.empty(rows.size, dtype=np.int64)
        emitted = np.full(rows.size, -1, dtype=np.int64)
        for k, row in enumerate(rows):
            output = self.outputs[row]
            assert output is not None
            lengths[k] = len(output)
            pending = self.pos_pending[row]
            if 0 <= pending < lengths[k]:
                emitted[k] = output[pending]
        rows_t = torch.from_numpy(rows).to(self.device, non_blocking=True)
        emitted_t = torch.from_numpy(emitted).to(self.device, non_blocking=True)
        # Device: commit mu where the emitted token is the one sampled, then step.
        commit = (emitted_t >= 0) & (emitted_t == self.x_pending[rows_t])
        mu = torch.where(commit, self.mu_pending[rows_t], self.mu[rows_t])
        self.mu[rows_t] = mu
        x, s, mu_next = truncated_step(logits[rows_t], mu, self.eta[rows_t],
                                        self.tau[rows_t], self.noise(rows, lengths, vocab))
        self.mu_pending[rows_t] = mu_next
        self.x_pending[rows_t] = x
        self.surprise_pending[rows_t] = s
        self.pos_pending[rows] = lengths
        forced = torch.full((rows.size, vocab), -math.inf, dtype=logits.dtype,
                            device=self.device)
        forced.scatter_(1, x.unsqueeze(1), 0.0)
        logits[rows_t] = forced
        return logits
