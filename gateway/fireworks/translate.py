"""Fireworks request -> vLLM worker request, plus the Plan the relay follows on the way back.

vLLM's OpenAI server already speaks most fields. Here Fireworks defaults are filled in (the
deployment's max_tokens, the model's generation-config sampling defaults), Fireworks-only
sampling extensions go into `vllm_xargs` for the engine plugins, and the Fireworks shapes
(logprobs formats, echo, token ids, structured output) are mapped to what vLLM offers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from gateway.config import Settings
from gateway.controlplane.registry import Deployment
from gateway.errors import GatewayError
from gateway.fireworks.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields

# Sampling knobs with a model default (generation_config.json) and the neutral value used
# when neither the client nor the model sets one.
NEUTRAL = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "typical_p": 1.0,
           "repetition_penalty": 1.0}
# Mirostat replaces the truncation samplers (llama.cpp semantics): they are ignored.
MIROSTAT_IGNORES = ("top_k", "top_p", "min_p")
_PASSTHROUGH = ("frequency_penalty", "presence_penalty", "seed", "n", "ignore_eos",
                "min_tokens", "user")


@dataclass
class Plan:
    """What the relay needs to turn the worker's answer into the Fireworks answer."""

    chat: bool
    logprobs: Literal["legacy", "content"] | None = None
    return_token_ids: bool = False
    raw_output: bool = False
    echo: bool = False  # echo or echo_last was asked for
    echo_last: int | None = None
    # What each prompt echoes (completions: the prompt or its last echo_last tokens; chat:
    # the rendered prompt), put in front of the generated text. Filled in by the router.
    echo_texts: list[str] = field(default_factory=list)
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


def _effective_sampling(request: SamplingFields, deployment: Deployment) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name, neutral in NEUTRAL.items():
        sent = getattr(request, name)
        values[name] = sent if sent is not None else deployment.generation_config.get(
            name, neutral)
    return values


def sampling_body(request: SamplingFields, deployment: Deployment, settings: Settings,
                  plan: Plan) -> dict[str, Any]:
    body: dict[str, Any] = {name: getattr(request, name) for name in _PASSTHROUGH
                            if getattr(request, name) is not None}
    sampling = _effective_sampling(request, deployment)
    ignored = []
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
    default_max = deployment.max_tokens_chat if plan.chat else deployment.max_tokens_completion
    requested = request.requested_max_tokens
    body["max_tokens"] = plan.max_tokens = default_max if requested is None else requested
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
    body.update(structured_output(request, plan.chat))
    plan.stream = bool(request.stream)
    if request.context_length_exceeded_behavior == "error":
        plan.context_check = "max_tokens" if request.max_tokens is not None \
            else "max_completion_tokens"
    plan.perf_metrics_in_response = bool(request.perf_metrics_in_response)
    if request.stream_options is not None:
        plan.include_usage = request.stream_options.include_usage
    if request.stream:
        body["stream"] = True
        # Always ask for usage (on every chunk, so prompt tokens are known at the first
        # token for the headers); the relay places it where Fireworks clients expect it.
        body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
    # Token ids come back whenever the answer needs them (logprob token_ids, raw_output).
    # (vLLM then leaves the echoed prompt out of the text; the relay puts it back.)
    if plan.logprobs or plan.return_token_ids or plan.raw_output or plan.echo:
        body["return_token_ids"] = True
    options = dict(sampling) | {"max_tokens": body["max_tokens"]}
    options |= {k: body[k] for k in ("frequency_penalty", "presence_penalty", "seed", "n",
                                     "ignore_eos", "min_tokens") if k in body}
    options |= {k: xargs[k] for k in ("mirostat_target", "mirostat_lr") if k in xargs}
    if ignored:
        options["ignored"] = ignored
    plan.sampling_options = options
    return body


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


def _logprobs_plan(request: SamplingFields) -> tuple[Literal["legacy", "content"] | None, int]:
    if request.logprobs is None or request.logprobs is False:
        return None, 0
    if request.logprobs is True:
        return "content", request.top_logprobs or 0
    return "legacy", request.top_logprobs if request.top_logprobs is not None \
        else int(request.logprobs)


def chat_body(request: ChatCompletionRequest, deployment: Deployment,
              settings: Settings) -> tuple[dict[str, Any], Plan]:
    fmt, top = _logprobs_plan(request)
    plan = Plan(chat=True, logprobs=fmt, return_token_ids=bool(request.return_token_ids),
                raw_output=bool(request.raw_output),
                echo=bool(request.echo) or request.echo_last is not None, n=request.n or 1)
    body = sampling_body(request, deployment, settings, plan)
    plan.prompt_fragments = [m.content for m in request.messages]
    body["messages"] = [
        message.model_dump(exclude_none=True) | (
            {"role": "system"} if message.role == "developer" else {})
        for message in request.messages
    ]
    if fmt:
        body["logprobs"] = True
        body["top_logprobs"] = top
        body["return_tokens_as_token_ids"] = True
    tools, tool_choice = request.tools, request.tool_choice
    if request.functions and not tools:  # deprecated form
        tools = [{"type": "function", "function": f} for f in request.functions]
        if isinstance(request.function_call, dict):
            tool_choice = {"type": "function", "function": request.function_call}
        elif request.function_call is not None:
            tool_choice = request.function_call
    if tools:
        if not deployment.tool_parser:
            raise GatewayError(400, f"Deployment {deployment.name} does not support tools "
                                    "(no tool parser configured)", param="tools")
        body["tools"] = tools
        if tool_choice == "any":
            tool_choice = "required"
        if isinstance(tool_choice, dict) and "function" not in tool_choice \
                and "name" in tool_choice:
            tool_choice = {"type": "function", "function": {"name": tool_choice["name"]}}
        if tool_choice is not None:
            body["tool_choice"] = tool_choice
        if request.parallel_tool_calls is not None:
            body["parallel_tool_calls"] = request.parallel_tool_calls
    return body, plan


def completion_body(request: CompletionRequest, deployment: Deployment,
                    settings: Settings) -> tuple[dict[str, Any], Plan]:
    fmt, top = _logprobs_plan(request)
    plan = Plan(chat=False, logprobs=fmt, return_token_ids=bool(request.return_token_ids),
                raw_output=bool(request.raw_output), echo_last=request.echo_last,
                echo=bool(request.echo) or request.echo_last is not None, n=request.n or 1)
    body = sampling_body(request, deployment, settings, plan)
    plan.prompt_fragments = request.prompt if isinstance(request.prompt, list) \
        else [request.prompt]
    body["prompt"] = request.prompt
    if plan.echo:
        body["echo"] = True  # for the prompt logprobs; the text comes from echo_texts
    if fmt:
        body["logprobs"] = top
        body["return_tokens_as_token_ids"] = True
    return body, plan
