"""Fireworks request -> vLLM worker request, plus the Plan the relay follows on the way back.

Pure: no I/O, nothing but the request, the deployment, the settings, the account and a
per-request nonce in; the worker body and the Plan out. Every field a request model accepts
either changes the worker body or the Plan, or is refused with a 400 naming it; the table in
tests/unit/test_translate.py holds one row per field, and docs/fireworks-api.md says the same
in words.

vLLM's OpenAI server already speaks most fields. Here Fireworks defaults are filled in (the
deployment's max_tokens, the model's generation-config sampling defaults), Fireworks-only
sampling extensions go into `vllm_xargs` for the engine plugins, and the Fireworks shapes
(logprobs formats, echo, token ids, structured output, reasoning, prompt-cache isolation,
priority) are mapped to what vLLM offers.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from gateway.config import Settings
from gateway.controlplane.registry import Deployment
from gateway.errors import GatewayError
from gateway.fireworks.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    EmbeddingRequest,
    SamplingFields,
)

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


@dataclass
class Plan:
    """What the relay needs to turn the worker's answer into the Fireworks answer."""

    chat: bool
    logprobs: Literal["legacy", "content"] | None = None
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


def _effective_sampling(request: SamplingFields, deployment: Deployment) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name, neutral in NEUTRAL.items():
        sent = getattr(request, name)
        values[name] = sent if sent is not None else deployment.generation_config.get(
            name, neutral)
    return values


def sampling_body(request: SamplingFields, deployment: Deployment, settings: Settings,
                  plan: Plan, account: str, nonce: str) -> dict[str, Any]:
    if deployment.task != "generate":
        raise GatewayError(400, f"Deployment {deployment.name} serves embeddings "
                                "(/embeddings), not generation", param="model")
    for name in ("speculation", "prediction"):
        if getattr(request, name) is not None:
            raise GatewayError(400, f"{name} is not supported: the workers take no "
                                    "speculative-decoding hints", param=name)
    body: dict[str, Any] = {name: getattr(request, name) for name in _PASSTHROUGH
                            if getattr(request, name) is not None}
    body["cache_salt"] = cache_salt(request, account, nonce)
    body.update(reasoning_body(request, deployment, plan.chat))
    sampling = _effective_sampling(request, deployment)
    ignored = []
    if request.service_tier == "priority":
        plan.priority = True  # the gateway's queue, when requests wait there
        if deployment.priority_scheduling:
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
    plan.metadata = request.metadata
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


class CacheScoped(Protocol):
    """What cache_salt reads of a request (prompt_cache_max_len where the API has it)."""

    @property
    def prompt_cache_isolation_key(self) -> str | None: ...


def cache_salt(request: CacheScoped, account: str, nonce: str) -> str:
    """vLLM's prefix-cache salt. Every account has its own (no account can learn another's
    prompts from cache timing); prompt_cache_isolation_key splits an account's further;
    prompt_cache_max_len 0 gives the request a salt of its own, so that nothing is reused."""
    max_len = getattr(request, "prompt_cache_max_len", None)
    if max_len:
        raise GatewayError(400, "prompt_cache_max_len: only 0 (no prompt caching for this "
                                "request) is supported", param="prompt_cache_max_len")
    scope = nonce if max_len == 0 else request.prompt_cache_isolation_key or ""
    return hashlib.sha256(f"{account}\0{scope}".encode()).hexdigest()[:32]


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


def chat_history(messages: list[ChatMessage], mode: str | None) -> list[dict[str, Any]]:
    """The messages for vLLM; reasoning_history says which earlier reasoning_content goes
    back into the prompt: none ("disabled"), that of the turns after the last user message
    ("interleaved", a tool-calling loop), or all ("preserved"; also when unset)."""
    last_user = max((i for i, m in enumerate(messages) if m.role == "user"), default=-1)
    out = []
    for i, message in enumerate(messages):
        item = message.model_dump(exclude_none=True)
        if message.role == "developer":
            item["role"] = "system"
        if mode == "disabled" or (mode == "interleaved" and i < last_user):
            item.pop("reasoning_content", None)
        out.append(item)
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


def _logprobs_plan(request: SamplingFields) -> tuple[Literal["legacy", "content"] | None, int]:
    if request.logprobs is None or request.logprobs is False:
        return None, 0
    if request.logprobs is True:
        return "content", request.top_logprobs or 0
    return "legacy", request.top_logprobs if request.top_logprobs is not None \
        else int(request.logprobs)


def chat_body(request: ChatCompletionRequest, deployment: Deployment, settings: Settings,
              *, account: str, nonce: str) -> tuple[dict[str, Any], Plan]:
    if request.prompt_truncate_len is not None:
        raise GatewayError(400, "prompt_truncate_len is not supported: send a prompt that "
                                "fits, or context_length_exceeded_behavior",
                           param="prompt_truncate_len")
    if request.safe_tokenization:
        raise GatewayError(400, "safe_tokenization is not supported", param="safe_tokenization")
    if request.echo_last is not None:
        raise GatewayError(400, "echo_last applies to /completions (chat's echo is the whole "
                                "rendered prompt)", param="echo_last")
    fmt, top = _logprobs_plan(request)
    plan = Plan(chat=True, logprobs=fmt, return_token_ids=bool(request.return_token_ids),
                raw_output=bool(request.raw_output),
                echo=bool(request.echo) or request.echo_last is not None, n=request.n or 1)
    body = sampling_body(request, deployment, settings, plan, account, nonce)
    plan.prompt_fragments = [m.content for m in request.messages]
    body["messages"] = chat_history(request.messages, request.reasoning_history)
    if fmt:
        body["logprobs"] = True
        body["top_logprobs"] = top
        body["return_tokens_as_token_ids"] = True
    tools, tool_choice = request.tools, request.tool_choice
    if tool_choice is not None and not tools:
        raise GatewayError(400, "tool_choice needs tools", param="tool_choice")
    if request.function_call is not None and not request.functions:
        raise GatewayError(400, "function_call needs functions", param="function_call")
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
        if tool_choice == "any":
            tool_choice = "required"
        if isinstance(tool_choice, dict) and "function" not in tool_choice \
                and "name" in tool_choice:
            tool_choice = {"type": "function", "function": {"name": tool_choice["name"]}}
        body["tools"] = strict_when_forced(tools, tool_choice)
        if tool_choice is not None:
            body["tool_choice"] = tool_choice
        if request.parallel_tool_calls is not None:
            body["parallel_tool_calls"] = request.parallel_tool_calls
    return body, plan


def strict_when_forced(tools: list[dict[str, Any]], tool_choice: Any
                       ) -> list[dict[str, Any]]:
    """A forced call (tool_choice naming a function, or "required") follows the forced
    tools' parameter schemas, as on Fireworks: those tools go to vLLM with `strict: true`,
    which constrains their arguments (vLLM 0.32 constrains only the call's envelope for
    tools that do not say `strict`). A tool whose `strict` the client set is left as sent;
    an automatic choice is left to the model."""
    if isinstance(tool_choice, dict):
        forced = {(tool_choice.get("function") or {}).get("name")}
    elif tool_choice == "required":
        forced = {(t.get("function") or {}).get("name") for t in tools}
    else:
        return tools
    out = []
    for tool in tools:
        function = tool.get("function")
        if isinstance(function, dict) and function.get("name") in forced \
                and "strict" not in function:
            tool = tool | {"function": function | {"strict": True}}
        out.append(tool)
    return out


def embedding_body(request: EmbeddingRequest, deployment: Deployment, *, account: str,
                   nonce: str) -> dict[str, Any]:
    """/embeddings: vLLM's own shape; the deployment must embed. `normalize` is vLLM's
    pooling activation (the embed pooler's is normalization); `prompt_template` is applied
    here, so the workers see plain texts."""
    if deployment.task != "embed":
        raise GatewayError(400, f"Deployment {deployment.name} generates text; embeddings "
                                "come from a deployment whose task is embed", param="model")
    if request.return_logits is not None:
        raise GatewayError(400, "return_logits is not supported: the workers' pooling "
                                "runner returns embeddings only", param="return_logits")
    body = request.model_dump(exclude_none=True, include={"dimensions", "encoding_format",
                                                          "user"})
    body["input"] = embedding_input(request.input, request.prompt_template)
    if request.normalize is not None:
        body["use_activation"] = request.normalize
    body["cache_salt"] = cache_salt(request, account, nonce)
    return body


_FIELD = re.compile(r"\{(\w+)\}")


def embedding_input(given: Any, template: str | None) -> Any:
    """The input as the workers take it. With a template each text (as `{text}`) or object
    (its fields, as `{name}`) becomes one string; objects need a template."""
    several = isinstance(given, list)
    items = given if several else [given]
    if template is None:
        if any(isinstance(item, dict) for item in items):
            raise GatewayError(400, "input objects need a prompt_template that places their "
                                    "fields", param="input")
        return given
    if "{{" in template or "{%" in template:
        raise GatewayError(400, "prompt_template: only {field} substitution is supported",
                           param="prompt_template")
    rendered = []
    for item in items:
        if isinstance(item, (int, list)):  # token ids
            raise GatewayError(400, "prompt_template applies to texts and objects, not to "
                                    "token ids", param="prompt_template")
        fields = item if isinstance(item, dict) else {"text": item}
        missing = sorted({name for name in _FIELD.findall(template) if name not in fields})
        if missing:
            raise GatewayError(400, f"prompt_template names {missing[0]!r}, which the input "
                                    "does not have", param="prompt_template")
        rendered.append(_render(template, fields))
    return rendered if several else rendered[0]


def _render(template: str, fields: dict[str, Any]) -> str:
    return _FIELD.sub(lambda match: str(fields[match.group(1)]), template)


def completion_body(request: CompletionRequest, deployment: Deployment, settings: Settings,
                    *, account: str, nonce: str) -> tuple[dict[str, Any], Plan]:
    if request.images is not None:
        raise GatewayError(400, "images on /completions are not supported: send image_url "
                                "content parts to /chat/completions", param="images")
    if request.reasoning_history is not None:
        raise GatewayError(400, "reasoning_history applies to chat messages",
                           param="reasoning_history")
    fmt, top = _logprobs_plan(request)
    plan = Plan(chat=False, logprobs=fmt, return_token_ids=bool(request.return_token_ids),
                raw_output=bool(request.raw_output), echo_last=request.echo_last,
                echo=bool(request.echo) or request.echo_last is not None, n=request.n or 1)
    body = sampling_body(request, deployment, settings, plan, account, nonce)
    plan.prompt_fragments = request.prompt if isinstance(request.prompt, list) \
        else [request.prompt]
    body["prompt"] = request.prompt
    if plan.echo:
        body["echo"] = True  # for the prompt logprobs; the text comes from echo_texts
    if fmt:
        body["logprobs"] = top
        body["return_tokens_as_token_ids"] = True
    return body, plan
