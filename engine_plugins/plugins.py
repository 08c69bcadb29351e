"""The classes vLLM loads: each serves both model runners, once per engine.

vLLM 0.32's V1 runner and Model Runner V2 have different processor interfaces, and each
loader only accepts subclasses of its own base class. These facades derive from both and
build the right implementation from the constructor's arguments (V1 passes a torch.device,
MRV2 a request-state object), so one registration works under either runner, through
`--logits-processors` and through the `vllm.logits_processors` entry point alike.

vLLM loads entry-point processors *in addition to* the command-line list, so with this
package installed and the launcher's `--logits-processors`, each class is constructed twice
for one engine. Only the first construction per engine is real; later ones are inert, so a
penalty is never applied twice.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.v1.sample.logits_processor import BatchUpdate
from vllm.v1.sample.logits_processor import LogitsProcessor as V1LogitsProcessor
from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsContext
from vllm.v1.worker.gpu.sample.logits_processor.interface import (
    LogitsProcessor as MRV2LogitsProcessor,
)

from engine_plugins.mirostat import Mirostat as MirostatV1
from engine_plugins.mrv2 import MirostatMRV2, RepetitionPenaltyMRV2
from engine_plugins.repetition import RepetitionPenalty as RepetitionPenaltyV1

# (id of the engine's VllmConfig, facade) -> that config, held so the id stays unique.
_built: dict[tuple[int, type], Any] = {}


def _first_for_engine(facade: type, vllm_config: Any) -> bool:
    key = (id(vllm_config), facade)
    if key in _built:
        return False
    _built[key] = vllm_config
    return True


class InertV1(V1LogitsProcessor):  # type: ignore[misc]
    def __init__(self, *_: Any) -> None:
        pass

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        pass

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits


class InertMRV2(MRV2LogitsProcessor):  # type: ignore[misc]
    def add_request(self, req_idx: int, sampling_params: Any) -> bool:
        return False

    def apply(self, logits: torch.Tensor, ctx: LogitsContext) -> torch.Tensor:
        return logits


def _build(facade: type, v1: type, mrv2: type, vllm_config: Any, second: Any,
           rest: tuple[Any, ...]) -> Any:
    is_v1 = isinstance(second, torch.device)
    if not _first_for_engine(facade, vllm_config):
        return InertV1() if is_v1 else InertMRV2(vllm_config, second)
    return v1(vllm_config, second, *rest) if is_v1 else mrv2(vllm_config, second)


class Mirostat(V1LogitsProcessor, MRV2LogitsProcessor):  # type: ignore[misc]
    validate_params = MirostatV1.validate_params

    def __new__(cls, vllm_config: Any, second: Any, *rest: Any) -> Any:
        return _build(cls, MirostatV1, MirostatMRV2, vllm_config, second, rest)


class RepetitionPenalty(V1LogitsProcessor, MRV2LogitsProcessor):  # type: ignore[misc]
    validate_params = RepetitionPenaltyV1.validate_params

    def __new__(cls, vllm_config: Any, second: Any, *rest: Any) -> Any:
        return _build(cls, RepetitionPenaltyV1, RepetitionPenaltyMRV2, vllm_config, second,
                      rest)
