"""Per-request Fireworks sampling arguments, read from `SamplingParams.extra_args`
(the request's `vllm_xargs`) and validated in vLLM's frontend.

Values arrive loosely typed (`"0.1"` stays a string, `true` becomes `1`), so everything is
coerced and range-checked here. Errors are raised as vLLM's validation error naming the
parameter, which the worker answers with HTTP 400. Nothing past this point may raise on
user input: `update_state`/`apply` run inside the engine core.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

MIROSTAT_TARGET = "mirostat_target"
MIROSTAT_LR = "mirostat_lr"
REPETITION_PENALTY = "repetition_penalty"

DEFAULT_MIROSTAT_LR = 0.1
# tau is in bits; log2 of any real vocabulary is far below this.
MAX_MIROSTAT_TARGET = 64.0
MAX_MIROSTAT_LR = 1.0
MAX_REPETITION_PENALTY = 2.0


try:
    from vllm.exceptions import VLLMValidationError as ArgumentError
except ImportError:  # a gateway-only install imports this module without vLLM
    ArgumentError = ValueError  # type: ignore[assignment,misc]


def validation_error(message: str, parameter: str, value: Any) -> Exception:
    """vLLM's validation error: the worker answers 400 naming the parameter."""
    if ArgumentError is ValueError:
        return ValueError(f"{message} (parameter={parameter}, value={value!r})")
    return ArgumentError(message, parameter=parameter, value=value)  # type: ignore[call-arg,no-any-return]


def _number(extra: dict[str, Any], key: str) -> float | None:
    """The value of extra[key] as a finite float, None when absent or null."""
    value = extra.get(key)
    if value is None:
        return None
    parameter = f"vllm_xargs.{key}"
    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise validation_error(f"{key} must be a number", parameter, value) from None
    if not isinstance(value, int | float):
        raise validation_error(f"{key} must be a number", parameter, value)
    number = float(value)
    if not math.isfinite(number):
        raise validation_error(f"{key} must be finite", parameter, value)
    return number


def _in_range(key: str, value: float, low: float, high: float, *, low_open: bool) -> None:
    too_low = value <= low if low_open else value < low
    if too_low or value > high:
        bracket = "(" if low_open else "["
        raise validation_error(f"{key} must be in {bracket}{low}, {high}], got {value}",
                               f"vllm_xargs.{key}", value)


@dataclass(frozen=True)
class MirostatArgs:
    tau: float  # target surprise, bits
    eta: float  # learning rate


def parse_mirostat(extra: dict[str, Any] | None, temperature: float = 1.0,
                   top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                   ) -> MirostatArgs | None:
    """Mirostat settings of one request, None when it is off (no mirostat_target)."""
    extra = extra or {}
    tau = _number(extra, MIROSTAT_TARGET)
    eta = _number(extra, MIROSTAT_LR)
    if tau is None:
        if eta is not None:
            raise validation_error("mirostat_lr needs mirostat_target",
                                   f"vllm_xargs.{MIROSTAT_LR}", extra.get(MIROSTAT_LR))
        return None
    _in_range(MIROSTAT_TARGET, tau, 0.0, MAX_MIROSTAT_TARGET, low_open=True)
    eta = DEFAULT_MIROSTAT_LR if eta is None else eta
    _in_range(MIROSTAT_LR, eta, 0.0, MAX_MIROSTAT_LR, low_open=False)
    if temperature <= 0.0:
        raise validation_error("Mirostat needs temperature > 0 (temperature 0 is greedy)",
                               "temperature", temperature)
    # Mirostat replaces the truncation samplers (llama.cpp semantics). The gateway drops
    # them; a direct caller that sends both gets told instead of silently mixing them.
    for name, value, neutral in (("top_k", top_k, top_k in (0, -1)),
                                 ("top_p", top_p, top_p >= 1.0),
                                 ("min_p", min_p, min_p <= 0.0)):
        if not neutral:
            raise validation_error(f"{name} does not combine with Mirostat", name, value)
    return MirostatArgs(tau=tau, eta=eta)


def validate_mirostat(params: Any) -> None:
    """`validate_params` of both Mirostat processors (V1 runner and Model Runner V2)."""
    parse_mirostat(params.extra_args, params.temperature, params.top_k, params.top_p,
                   params.min_p)


def parse_repetition_penalty(extra: dict[str, Any] | None) -> float | None:
    """The processor's repetition penalty, None when absent or exactly 1 (off)."""
    penalty = _number(extra or {}, REPETITION_PENALTY)
    if penalty is None:
        return None
    _in_range(REPETITION_PENALTY, penalty, 0.0, MAX_REPETITION_PENALTY, low_open=True)
    return None if penalty == 1.0 else penalty
