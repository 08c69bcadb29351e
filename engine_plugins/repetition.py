"""Fireworks `repetition_penalty` as a V1 logits processor.

Same semantics as vLLM's native field: every token id seen in the prompt or in the output so
far is penalised once (logit / p when positive, logit * p otherwise), before temperature.
It calls the very kernel wrapper vLLM's native path calls, so results are bit-exact.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from vllm._custom_ops import apply_repetition_penalties
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from engine_plugins.xargs import parse_repetition_penalty

if TYPE_CHECKING:
    from vllm import SamplingParams
    from vllm.config import VllmConfig


class RepetitionPenalty(LogitsProcessor):  # type: ignore[misc]
    """Rows carry (penalty, prompt ids, live output list); masks are built per step from
    them, as the native path does, so nothing vocabulary-sized moves with the batch."""

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool):
        self.device = device
        # row -> (penalty, prompt token ids tensor, live output token list)
        self.rows: dict[int, tuple[float, torch.Tensor, list[int]]] = {}

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        parse_repetition_penalty(sampling_params.extra_args)

    def is_argmax_invariant(self) -> bool:
        return False  # it can change the argmax, so it runs before temperature, like native

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.rows.pop(index, None)
        for index, params, prompt, output in batch_update.added:
            penalty = parse_repetition_penalty(params.extra_args)
            if penalty is None:
                self.rows.pop(index, None)
            else:
                prompt_ids = torch.tensor(prompt or [], dtype=torch.int64)
                self.rows[index] = (penalty, prompt_ids, output)
        for a, b, direction in batch_update.moved:
            row_a, row_b = self.rows.pop(a, None), self.rows.pop(b, None)
            if row_a is not None:
                self.rows[b] = row_a
            if direction == MoveDirectionality.SWAP and row_b is not None:
                self.rows[a] = row_b

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return logits
        batch, vocab = logits.shape
        indices = [i for i in self.rows if i < batch]
        if not indices:
            return logits
        # Prompt and output ids of each row, padded with `vocab` (a bin that is cut off);
        # -1 placeholders of async scheduling also go to that bin, as in vLLM.
        sequences = []
        for i in indices:
            _, prompt_ids, output = self.rows[i]
            sequences.append(torch.cat([prompt_ids, torch.tensor(output, dtype=torch.int64)]))
        ids = torch.nn.utils.rnn.pad_sequence(sequences, batch_first=True, padding_value=vocab)
        ids = ids.masked_fill_(ids < 0, vocab).to(self.device, non_blocking=True)
        seen = torch.zeros((len(indices), vocab + 1), dtype=torch.bool, device=self.device)
        seen.scatter_(1, ids, True)
        seen = seen[:, :vocab]
        penalties = torch.tensor([self.rows[i][0] for i in indices], dtype=logits.dtype)
        rows = torch.tensor(indices, dtype=torch.int64).to(self.device, non_blocking=True)
        selected = logits[rows]
        # The native call passes prompt and output masks separately and ORs them; one
        # union mask twice gives the identical result.
        apply_repetition_penalties(selected, seen, seen,
                                   penalties.to(self.device, non_blocking=True))
        logits[rows] = selected
        return logits


