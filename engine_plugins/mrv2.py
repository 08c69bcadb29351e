"""The same processors for vLLM's Model Runner V2 (the GPU default in vLLM 0.32).

MRV2 keys state by a request *slot* that is stable for the request's lifetime, calls `apply`
before temperature (so Mirostat scales by 1/T itself) and after penalties, and still samples
rows of unfinished chunked prefills (recognised by pos + 1 < prefill_len) only to throw the
sample away.

Unit-tested on CPU with fake request state; until it has run on a GPU the launcher selects
the V1 runner when the plugins are loaded.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
from vllm.v1.worker.gpu.sample.logits_processor.interface import (
    LogitsContext,
    LogitsProcessor,
    LogitsProcRequestState,
)

from engine_plugins.mirostat import gumbel_noise, position_seed, truncated_step
from engine_plugins.xargs import parse_mirostat, parse_repetition_penalty, validate_mirostat

if TYPE_CHECKING:
    from vllm import SamplingParams
    from vllm.config import VllmConfig


class MirostatMRV2(LogitsProcessor):  # type: ignore[misc]
    def __init__(self, vllm_config: VllmConfig, req_states: LogitsProcRequestState) -> None:
        if getattr(vllm_config, "speculative_config", None) is not None:
            # mu depends on each accepted token in turn; draft rows would corrupt it.
            raise ValueError("Mirostat does not support speculative decoding")
        self.req_states = req_states
        slots, device = req_states.max_num_reqs, req_states.device
        self.device = device
        f32 = {"dtype": torch.float32, "device": device}
        self.mu = torch.zeros(slots, **f32)
        self.mu_pending = torch.zeros(slots, **f32)
        self.surprise_pending = torch.zeros(slots, **f32)
        self.tau = torch.zeros(slots, **f32)
        self.eta = torch.zeros(slots, **f32)
        self.inv_temperature = torch.ones(slots, **f32)
        self.x_pending = torch.full((slots,), -1, dtype=torch.int64, device=device)
        self.pos_pending = torch.full((slots,), -2, dtype=torch.int64, device=device)
        self.active = torch.zeros(slots, dtype=torch.bool, device=device)
        # Host mirrors: the early exit and the noise need no device reads.
        self.active_np = np.zeros(slots, dtype=bool)
        self.seed_np = np.full(slots, -1, dtype=np.int64)
        self.staged: dict[int, tuple[bool, float, float, float]] = {}
        self.generator = torch.Generator(device=device)
        self.generator.seed()

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        validate_mirostat(sampling_params)

    def add_request(self, req_idx: int, sampling_params: SamplingParams) -> bool:
        p = sampling_params
        args = parse_mirostat(p.extra_args, max(p.temperature, 1e-6))
        active = args is not None and p.temperature > 0.0
        self.active_np[req_idx] = active
        self.seed_np[req_idx] = -1 if p.seed is None else p.seed
        if args is None or not active:
            self.staged[req_idx] = (False, 0.0, 0.0, 1.0)
        else:
            self.staged[req_idx] = (True, args.tau, args.eta, 1.0 / p.temperature)
        return active

    def apply_staged_writes(self) -> None:
        if not self.staged:
            return
        slots = torch.tensor(list(self.staged), dtype=torch.int64, device=self.device)
        values = torch.tensor([v[1:] for v in self.staged.values()], dtype=torch.float32,
                              device=self.device)
        self.active[slots] = torch.tensor([v[0] for v in self.staged.values()],
                                          device=self.device)
        self.tau[slots], self.eta[slots] = values[:, 0], values[:, 1]
        self.inv_temperature[slots] = values[:, 2]
        self.mu[slots] = 2.0 * values[:, 0]
        self.mu_pending[slots] = 2.0 * values[:, 0]
        self.x_pending[slots] = -1
        self.pos_pending[slots] = -2
        self.staged.clear()

    def noise(self, ctx: LogitsContext, vocab: int) -> torch.Tensor:
        """(seed, position)-keyed Gumbel noise for seeded rows, a batched draw otherwise.
        Positions come from the host-side sequence lengths (exact without speculative
        decoding, which this processor refuses), so nothing is read back from the device."""
        slots = ctx.idx_mapping_np
        uniform = torch.rand((len(slots), vocab), generator=self.generator, device=self.device)
        for row, slot in enumerate(slots):
            if self.active_np[slot] and self.seed_np[slot] >= 0:
                position = int(ctx.seq_lens_upper_bound_np[row]) - 1
                g = torch.Generator(device=self.device)
                g.manual_seed(position_seed(int(self.seed_np[slot]), position))
                uniform[row] = torch.rand(vocab, generator=g, device=self.device)
        return gumbel_noise(uniform)

    def apply(self, logits: torch.Tensor, ctx: LogitsContext) -> torch.Tensor:
        if not self.active_np[ctx.idx_mapping_np].any():
            return logits
        slots = ctx.expanded_idx_mapping
        active = self.active[slots]
        # Commit: the token fed at this position is the one sampled at the previous one.
        commit = active & (ctx.pos == self.pos_pending[slots] + 1) & \
            (ctx.input_ids == self.x_pending[slots])
        mu = torch.where(commit, self.mu_pending[slots], self.mu[slots])
        self.mu[slots] = mu
        # Rows of unfinished chunked prefills are sampled and thrown away: leave them be.
        emit = active & (ctx.pos + 1 >= self.req_states.prefill_len.gpu[slots])
        z = logits * self.inv_temperature[slots].unsqueeze(1)
        x, s, mu_next = truncated_step(z, mu, self.eta[slots], self.tau[slots],
                                       self.noise(ctx, logits.shape[1]))
        self.mu_pending[slots] = torch.where(emit, mu_next, self.mu_pending[slots])
        self.surprise_pending[slots] = torch.where(emit, s, self.surprise_pending[slots])
        self.x_pending[slots] = torch.where(emit, x, self.x_pending[slots])
        self.pos_pending[slots] = torch.where(emit, ctx.pos, self.pos_pending[slots])
        forced = torch.full_like(logits, -math.inf).scatter_(1, x.unsqueeze(1), 0.0)
        return torch.where(emit.unsqueeze(1), forced, logits)


class RepetitionPenaltyMRV2(LogitsProcessor):  # type: ignore[misc]
    """Penalises every id among the tokens fed so far (prompt and output, all_token_ids up
    to the row's position). Multiplies by the reciprocal like MRV2's own Triton kernel,
    so it agrees with the native field to float rounding, not bit for bit."""

    def __init__(self, vllm_config: VllmConfig, req_states: LogitsProcRequestState) -> None:
        self.req_states = req_states
        self.device = req_states.device
        self.penalty = torch.ones(req_states.max_num_reqs, dtype=torch.float32,
                                  device=self.device)
        self.active_np = np.zeros(req_states.max_num_reqs, dtype=bool)
        self.staged: dict[int, float] = {}

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        parse_repetition_penalty(sampling_params.extra_args)

    def add_request(self, req_idx: int, sampling_params: SamplingParams) -> bool:
        penalty = parse_repetition_penalty(sampling_params.extra_args)
        self.active_np[req_idx] = penalty is not None
        self.staged[req_idx] = 1.0 if penalty is None else penalty
        return penalty is not None

    def apply_staged_writes(self) -> None:
        if self.staged:
            slots = torch.tensor(list(self.staged), dtype=torch.int64, device=self.device)
            self.penalty[slots] = torch.tensor(list(self.staged.values()),
                                               dtype=torch.float32, device=self.device)
            self.staged.clear()

    def apply(self, logits: torch.Tensor, ctx: LogitsContext) -> torch.Tensor:
        if not self.active_np[ctx.idx_mapping_np].any():
            return logits
        vocab = logits.shape[1]
        slots = ctx.expanded_idx_mapping
        length = int(ctx.seq_lens_upper_bound_np.max())
        tokens = self.req_states.all_token_ids.gpu[slots, :length]
        fed = torch.arange(length, device=self.device).unsqueeze(0) <= ctx.pos.unsqueeze(1)
        tokens = torch.where(fed & (tokens >= 0) & (tokens < vocab), tokens, vocab)
        seen = torch.zeros((slots.shape[0], vocab + 1), dtype=torch.bool, device=self.device)
        seen.scatter_(1, tokens, True)
        seen[torch.arange(slots.shape[0], device=self.device), ctx.input_ids.clamp(0, vocab)] \
            = True
        penalty = self.penalty[slots].unsqueeze(1)
        scale = torch.where(logits > 0, 1.0 / penalty, penalty)
        logits.mul_(torch.where(seen[:, :vocab], scale, 1.0))
        return logits
