"""The classes vLLM loads: each serves both model runners.

vLLM 0.32's V1 runner and Model Runner V2 have different processor interfaces, and each
loader only accepts subclasses of its own base class. These facades derive from both and
build the right implementation from the constructor's arguments (V1 passes a torch.device,
MRV2 a request-state object), so one registration works under either runner, through
`--logits-processors` and through the `vllm.logits_processors` entry point alike.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.v1.sample.logits_processor import LogitsProcessor as V1LogitsProcessor
from vllm.v1.worker.gpu.sample.logits_processor.interface import (
    LogitsProcessor as MRV2LogitsProcessor,
)

from engine_plugins.mirostat import Mirostat as MirostatV1
from engine_plugins.mrv2 import MirostatMRV2, RepetitionPenaltyMRV2
from engine_plugins.repetition import RepetitionPenalty as RepetitionPenaltyV1


class Mirostat(V1LogitsProcessor, MRV2LogitsProcessor):  # type: ignore[misc]
    validate_params = MirostatV1.validate_params

    def __new__(cls, vllm_config: Any, second: Any, *rest: Any) -> Any:
        if isinstance(second, torch.device):
            return MirostatV1(vllm_config, second, *rest)
        return MirostatMRV2(vllm_config, second)


class RepetitionPenalty(V1LogitsProcessor, MRV2LogitsProcessor):  # type: ignore[misc]
    validate_params = RepetitionPenaltyV1.validate_params

    def __new__(cls, vllm_config: Any, second: Any, *rest: Any) -> Any:
        if isinstance(second, torch.device):
            return RepetitionPenaltyV1(vllm_config, second, *rest)
        return RepetitionPenaltyMRV2(vllm_config, second)
