"""Fireworks request models (docs/fireworks-api.md), kept apart from behaviour.

Validation is strict, like Fireworks: an unknown field is a 400 naming it. Ranges are the
documented ones; `None` always means "use the default".
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, model_validator

from gateway.api import MAX_TOKENS
from gateway.validation import FieldError, Metadata

Probability = Annotated[float, Field(ge=0.0, le=1.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(Strict):
    include_usage: StrictBool | None = None


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema", "grammar"]
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    json_schema: dict[str, Any] | None = None
    grammar: str | None = None


class Thinking(Strict):
    type: Literal["enabled", "disabled"]
    budget_tokens: Annotated[int, Field(ge=1024)] | None = None


class Prediction(Strict):
    type: Literal["content"]
    content: str | list[dict[str, Any]]


class SamplingFields(Strict):
    """Fields shared by /chat/completions and /completions."""

    model: str
    stream: StrictBool | None = False
    max_tokens: Annotated[int, Field(ge=0, le=MAX_TOKENS)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=0, le=MAX_TOKENS)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Probability | None = None
    top_k: Annotated[int, Field(ge=0, le=100)] | None = None
    min_p: Probability | None = None
    typical_p: Probability | None = None
    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None
    repetition_penalty: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    mirostat_target: float | None = None
    mirostat_lr: float | None = None
    seed: int | None = None
    n: Annotated[int, Field(ge=1, le=128)] | None = 1
    stop: str | list[str] | None = None
    logprobs: StrictBool | Annotated[int, Field(ge=0, le=5)] | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    echo: StrictBool | None = False
    echo_last: Annotated[int, Field(ge=0)] | None = None
    ignore_eos: StrictBool | None = False
    context_length_exceeded_behavior: Literal["truncate", "error"] | None = "truncate"
    response_format: ResponseFormat | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-200.0, le=200.0)]] | None = None
    user: str | None = None
    perf_metrics_in_response: StrictBool | None = False
    raw_output: StrictBool | None = False
    return_token_ids: StrictBool | None = False
    prompt_cache_key: str | None = None
    prompt_cache_isolation_key: str | None = None
    prompt_cache_max_len: Annotated[int, Field(ge=0)] | None = None
    service_tier: Literal["auto", "default", "flex", "priority"] | None = None
    # A level, true ("medium") / false ("none"), or a cap on reasoning tokens.
    reasoning_effort: Literal["none", "low", "medium", "high"] | StrictBool \
        | Annotated[int, Field(ge=1)] | None = None
    reasoning_history: Literal["disabled", "interleaved", "preserved"] | None = None
    thinking: Thinking | None = None
    speculation: str | list[int] | None = None
    prediction: Prediction | str | None = None
    metadata: Metadata | None = None
    min_tokens: Annotated[int, Field(ge=0)] | None = None
    stream_options: StreamOptions | None = None

    @model_validator(mode="after")
    def _exclusive_fields(self) -> SamplingFields:
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise FieldError("max_completion_tokens",
                             "max_tokens and max_completion_tokens cannot both be set")
        if self.thinking is not None and self.reasoning_effort is not None:
            raise FieldError("thinking", "thinking and reasoning_effort cannot both be set")
        if isinstance(self.stop, list) and len(self.stop) > 4:
            raise FieldError("stop", "at most 4 stop sequences are allowed")
        for key in self.logit_bias or {}:
            if not key.isdigit():
                raise FieldError("logit_bias", f"logit_bias keys must be token ids, got {key!r}")
        if self.stream and self.echo_last is not None:
            raise FieldError("echo_last", "echo_last is not supported with stream")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens if self.max_tokens is not None else self.max_completion_tokens

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ContentPart(Strict):
    type: Literal["text", "image_url", "video_url", "audio_url"]
    text: str | None = None
    image_url: dict[str, Any] | None = None
    video_url: dict[str, Any] | None = None
    audio_url: dict[str, Any] | None = None


class ToolCallFunction(Strict):
    name: str
    arguments: str | dict[str, Any]


class ToolCall(Strict):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction
    index: int | None = None


class ChatMessage(Strict):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: StrictBool | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    prompt_truncate_len: Annotated[int, Field(ge=0)] | None = None
    safe_tokenization: StrictBool | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    images: list[str] | list[list[str]] | None = None

    @model_validator(mode="after")
    def _non_empty_prompts(self) -> CompletionRequest:
        if self.prompt in ("", []) or (isinstance(self.prompt, list)
                                       and any(p in ("", []) for p in self.prompt)):
            raise FieldError("prompt", "prompt must not be empty")
        return self


class EmbeddingRequest(Strict):
    """/embeddings (OpenAI's shape, as Fireworks serves it, with Fireworks' extras)."""

    model: str
    # Texts, token ids, or objects whose fields `prompt_template` places into text.
    input: Annotated[str, Field(min_length=1)] | Annotated[list[str], Field(min_length=1)] \
        | Annotated[list[int], Field(min_length=1)] \
        | Annotated[list[list[int]], Field(min_length=1)] \
        | Annotated[dict[str, Any], Field(min_length=1)] \
        | Annotated[list[dict[str, Any]], Field(min_length=1)]
    dimensions: Annotated[int, Field(ge=1)] | None = None
    encoding_format: Literal["float", "base64"] | None = None
    user: str | None = None
    normalize: StrictBool | None = None
    prompt_template: Annotated[str, Field(min_length=1)] | None = None
    return_logits: list[int] | None = None
    perf_metrics_in_response: StrictBool | None = False
    prompt_cache_key: str | None = None
    prompt_cache_isolation_key: str | None = None


def prompts_of(prompt: str | list[str] | list[int] | list[list[int]]) -> list[Any]:
    """A completions `prompt` as its list of prompts (a token-id list is one prompt)."""
    several = isinstance(prompt, list) and bool(prompt) and not isinstance(prompt[0], int)
    return list(prompt) if several else [prompt]


def prompt_list_estimate(prompt: Any) -> int:
    """Prompt tokens before the worker counts them, for a prompt or input that is a string,
    a list of strings, token ids, or lists of them: about four characters per token of
    text; token ids count exactly."""
    prompts = prompt if isinstance(prompt, list) else [prompt]
    if prompts and all(isinstance(p, int) for p in prompts):
        return len(prompts)
    return sum(len(p) if isinstance(p, list) else len(str(p)) // 4 + 1 for p in prompts)
