"""What the generation APIs (/chat/completions, /completions) share in translation: the
sampling fields -> the worker body's sampling part and the values the Plan takes, the cache
salt, reasoning, structured output and logprobs.

Pure: no I/O, nothing but the request, the deployment, the settings, the account and a
per-request nonce in; values out (nothing is filled in that the caller hands over). Every
field a request model accepts either changes the worker body or the Plan, or is refused with
a 400 naming it; the table in tests/unit/fireworks/test_translate.py holds one row per field,
and docs/fireworks-api.md says the same in words.

vLLM's OpenAI server already speaks most fields. Here Fireworks defaults are filled in (the
deployment's max_tokens, the model's generation-config sampling defaults), Fireworks-only
sampling extensions go into `vllm_xargs` for the engine plugins, and the Fireworks shapes
(logprobs formats, structured output, reasoning, prompt-cache isolation, priority) are
mapped to what vLLM offers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from gateway.config import Settings
from gateway.controlplane.registry import Deployment
from gateway.errors import GatewayError
from gateway.fireworks.protocol import SamplingFields

# Sampling knobs with a model default (generation_config.json) and the neutral value used
# when neither the client nor the model sets one.
NEUTRAL = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "typical_p": 1.0,
           "repetition_penalty": 1.0}

# Mirostat replaces the truncation samplers (llama.cpp semantics): they are ignored.
MIROSTAT_IGNORES = ("top_k", "top_p", "min_p")

_PASSTHROUGH = ("frequency_penalty", "presence_penalty", "seed", "n", "ignore_eos",
                "min_tokens", "user")

# vLLM schedules lower numbers first; 0 is everyone else.
PRIORITY = -1

LogprobsFormat = Literal["legacy", "content"] | None


@dataclass
class Plan:
    """What the relay needs to turn the worker's answer into the Fireworks answer."""

    chat: bool
    logprobs: LogprobsFormat = None
    return_token_ids: bool = False
    raw_output: bool = False
    echo: bool = False  # echo or echo_last was asked for (the texts come from the worker)
    echo_last: int | None = None
    n: int = 1
    max_tokens: int = 0
    sampling_options: dict[str, Any] = field(default_factory=dict)
    stream: bool = False
    # context_length_exceeded_behavior=error: the field to name when the prompt and
    # max_tokens do not fit (checked on the worker before generating); None: truncate.
    context_check: str | None = None
    include_usage: bool | None = None  # the client's stream_options.include_usage
    perf_metrics_in_response: bool = False
    prompt_fragments: list[Any] = field(default_factory=list)  # for raw_output
    metadata: dict[str, str] | None = None  # the client's, kept with the usage record
    priority: bool = False  # service_tier "priority"
    # Why a stream of it would not be continued on another worker after its worker failed
    # (a feature's name; continuation.py); None: it would be.
    not_continued: str | None = None


@dataclass
class Sampling:
    """The sampling fields translated: the worker body's part, and what the Plan takes of
    them (`plan` adds what only the API knows)."""

    body: dict[str, Any]
    max_tokens: int
    sampling_options: dict[str, Any]
    stream: bool
    context_check: str | None
    include_usage: bool | None
    perf_metrics_in_response: bool
    metadata: dict[str, str] | None
    priority: bool

    def plan(self, *, chat: bool, logprobs: LogprobsFormat, return_token_ids: bool,
             raw_output: bool, echo: bool, n: int, prompt_fragments: list[Any],
             echo_last: int | None = None) -> Plan:
        return Plan(chat=chat, logprobs=logprobs, return_token_ids=return_token_ids,
                    raw_output=raw_output, echo=echo, echo_last=echo_last, n=n,
                    max_tokens=self.max_tokens, sampling_options=self.sampling_options,
                    stream=self.stream, context_check=self.context_check,
                    include_usage=self.include_usage,
                    perf_metrics_in_response=self.perf_metrics_in_response,
                    prompt_fragments=prompt_fragments, metadata=self.metadata,
                    priority=self.priority)


def _effective_sampling(request: SamplingFields, deployment: Deployment) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name, neutral in NEUTRAL.items():
        sent = getattr(request, name)
        values[name] = sent if sent is not None else deployment.generation_config.get(
            name, neutral)
    return values


def sampling_body(request: SamplingFields, deployment: Deployment, settings: Settings, *,
                  chat: bool, token_ids: bool, priority_tier: bool = False) -> Sampling:
    """The sampling part of a generation request. `token_ids`: the answer needs token ids
    back (logprob token ids, raw_output, echo); `priority_tier`: the account may ask for
    priority service (Route.priority_tier)."""
    if deployment.task != "generate":
        raise GatewayError(400, f"Deployment {deployment.name} serves embeddings "
                                "(/embeddings), not generation", param="model")
    for name in ("speculation", "prediction"):
        if getattr(request, name) is not None:
            raise GatewayError(400, f"{name} is not supported: the workers take no "
                                    "speculative-decoding hints", param=name)
    body: dict[str, Any] = {name: getattr(request, name) for name in _PASSTHROUGH
                            if getattr(request, name) is not None}
    body.update(reasoning_body(request, deployment, chat))
    sampling = _effective_sampling(request, deployment)
    ignored = []
    asked = request.service_tier == "priority"
    priority = asked and priority_tier  # the gateway's queue, when requests wait
    if asked:
        if priority and deployment.priority_scheduling:
            body["priority"] = PRIORITY
        else:  # best effort, as on Fireworks: said in fireworks-sampling-options
            ignored.append("service_tier")
    if request.mirostat_lr is not None and request.mirostat_target is None:
        ignored.append("mirostat_lr")
    if request.top_logprobs and request.logprobs in (None, False):
        ignored.append("top_logprobs")
    if request.mirostat_target is not None:
        ignored += [k for k in MIROSTAT_IGNORES if sampling[k] != NEUTRAL[k]]
        sampling.update({k: NEUTRAL[k] for k in MIROSTAT_IGNORES})
    if sampling["typical_p"] != 1.0:
        ignored.append("typical_p")  # vLLM has no typical-p sampler
    body["temperature"] = sampling["temperature"]
    body["top_p"] = sampling["top_p"]
    body["min_p"] = sampling["min_p"]
    if sampling["top_k"]:  # Fireworks' 0 means off, which is vLLM's default
        body["top_k"] = sampling["top_k"]
    default_max = deployment.max_tokens_chat if chat else deployment.max_tokens_completion
    requested = request.requested_max_tokens
    body["max_tokens"] = default_max if requested is None else requested
    if request.stop is not None:
        body["stop"] = request.stop_list
        body["include_stop_str_in_output"] = settings.stop_include_in_output
    if request.logit_bias:
        body["logit_bias"] = {k: max(-100.0, min(100.0, v))  # vLLM's accepted range
                              for k, v in request.logit_bias.items()}
    xargs: dict[str, Any] = {}
    if request.mirostat_target is not None:
        xargs["mirostat_target"] = request.mirostat_target
        xargs["mirostat_lr"] = 0.1 if request.mirostat_lr is None else request.mirostat_lr
    penalty = sampling["repetition_penalty"]
    if penalty != 1.0:
        if settings.repetition_penalty_native:
            body["repetition_penalty"] = penalty
        else:
            xargs["repetition_penalty"] = penalty
    if xargs:
        body["vllm_xargs"] = xargs
    body.update(structured_output(request, chat))
    context_check = None
    if request.context_length_exceeded_behavior == "error":
        context_check = "max_tokens" if request.max_tokens is not None \
            else "max_completion_tokens"
    if request.stream:
        body["stream"] = True
        # Always ask for usage (on every chunk, so prompt tokens are known at the first
        # token for the headers); the relay places it where Fireworks clients expect it.
        body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
    # Token ids come back whenever the answer needs them (logprob token_ids, raw_output).
    # (vLLM then leaves the echoed prompt out of the text; the relay puts it back.)
    if token_ids:
        body["return_token_ids"] = True
    options = dict(sampling) | {"max_tokens": body["max_tokens"]}
    options |= {k: body[k] for k in ("frequency_penalty", "presence_penalty", "seed", "n",
                                     "ignore_eos", "min_tokens") if k in body}
    options |= {k: xargs[k] for k in ("mirostat_target", "mirostat_lr") if k in xargs}
    if ignored:
        options["ignored"] = ignored
    return Sampling(
        body=body, max_tokens=body["max_tokens"], sampling_options=options,
        stream=bool(request.stream), context_check=context_check,
        include_usage=None if request.stream_options is None
        else request.stream_options.include_usage,
        perf_metrics_in_response=bool(request.perf_metrics_in_response),
        metadata=request.metadata, priority=priority)


class CacheScoped(Protocol):
    """What cache_scope reads of a request (prompt_cache_max_len where the API has it)."""

    @property
    def prompt_cache_isolation_key(self) -> str | None: ...


def cache_scope(request: CacheScoped) -> str | None:
    """Which of the account's prefix caches the request shares (the Call's cache_scope; the
    data plane salts every request with its account): prompt_cache_isolation_key splits an
    account's further; prompt_cache_max_len 0 shares none, so that nothing is reused."""
    max_len = getattr(request, "prompt_cache_max_len", None)
    if max_len:
        raise GatewayError(400, "prompt_cache_max_len: only 0 (no prompt caching for this "
                                "request) is supported", param="prompt_cache_max_len")
    return None if max_len == 0 else request.prompt_cache_isolation_key or ""


def reasoning_body(request: SamplingFields, deployment: Deployment,
                   chat: bool) -> dict[str, Any]:
    """reasoning_effort or thinking -> vLLM's reasoning_effort and thinking_token_budget (the
    answer's reasoning comes back as reasoning_content, by the deployment's parser)."""
    param, effort, budget = "reasoning_effort", None, None
    value = request.reasoning_effort
    if request.thinking is not None:
        param = "thinking"
        effort = "none" if request.thinking.type == "disabled" else "medium"
        budget = request.thinking.budget_tokens
    elif isinstance(value, bool):
        effort = "medium" if value else "none"
    elif isinstance(value, int):
        effort, budget = "medium", value  # a cap on reasoning tokens
    elif value is not None:
        effort = value
    if effort is None or (effort == "none" and deployment.reasoning_parser is None):
        return {}  # nothing asked, or nothing to turn off
    if deployment.reasoning_parser is None:
        raise GatewayError(400, f"Deployment {deployment.name} does not support reasoning "
                                "(no reasoning parser configured)", param=param)
    if not chat:
        raise GatewayError(400, "Reasoning is set through /chat/completions", param=param)
    out: dict[str, Any] = {"reasoning_effort": effort}
    if budget is not None and effort != "none":
        out["thinking_token_budget"] = budget
    return out


def structured_output(request: SamplingFields, chat: bool) -> dict[str, Any]:
    """`response_format` -> vLLM structured outputs (JSON schema, JSON object, grammar)."""
    fmt = request.response_format
    if fmt is None or fmt.type == "text":
        return {}
    if fmt.type == "grammar":
        if not fmt.grammar:
            raise GatewayError(400, "response_format.grammar is required for type 'grammar'",
                               param="response_format.grammar")
        return {"structured_outputs": {"grammar": fmt.grammar}}
    schema = fmt.schema_
    if fmt.type == "json_schema":
        spec = fmt.json_schema or {}
        schema = spec.get("schema", spec if "name" not in spec else None)
        if not schema:
            raise GatewayError(400, "response_format.json_schema needs a schema",
                               param="response_format.json_schema")
    if schema is not None:
        return {"structured_outputs": {"json": schema}}
    if chat:
        return {"response_format": {"type": "json_object"}}
    return {"structured_outputs": {"json_object": True}}


def logprobs_plan(request: SamplingFields) -> tuple[LogprobsFormat, int]:
    """The logprobs format the client asked for, and how many alternatives per token."""
    if request.logprobs is None or request.logprobs is False:
        return None, 0
    if request.logprobs is True:
        return "content", request.top_logprobs or 0
    return "legacy", request.top_logprobs if request.top_logprobs is not None \
        else int(request.logprobs)

