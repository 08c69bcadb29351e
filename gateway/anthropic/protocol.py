"""Anthropic's Messages protocol: what the gateway reads of a request, its error envelope,
and the usage in its answers and events (pure; the API object is api.py).

The gateway validates what it needs (the model, `max_tokens`, `messages`, `stream`) and
leaves the rest of Anthropic's fields that the workers take to the worker, whose 400s pass
through in Anthropic's shape. Any other field is a 400 naming it: nothing a client names
reaches the engine past these lists (no `cache_salt`, `priority`, `kv_transfer_params`: the
data plane salts every request with its account, dataplane/isolation.py).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool

from gateway.api import MAX_TOKENS

# status -> Anthropic's error type
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
               403: "permission_error", 404: "not_found_error", 408: "timeout_error",
               413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error",
               504: "timeout_error"}


class Prompt(BaseModel):
    """What both requests share: the prompt, and the Anthropic fields the workers judge
    (vLLM's Messages API), sent on as they are; and two the gateway reads for the affinity
    key, which go no further (GATEWAY_ONLY)."""

    model_config = ConfigDict(extra="forbid")

    model: str
    messages: list[dict[str, Any]] = Field(min_length=1)
    system: Any = None
    tools: Any = None
    tool_choice: Any = None
    thinking: Any = None
    output_config: Any = None
    prompt_cache_key: Any = None
    user: Any = None


GATEWAY_ONLY = {"prompt_cache_key", "user"}


class MessagesMetadata(BaseModel):
    """Anthropic's request metadata: an opaque id of the end user, at most 256 characters
    (as Anthropic bounds it)."""

    model_config = ConfigDict(extra="forbid")
    user_id: Annotated[str, Field(max_length=256)] | None = None


class MessagesRequest(Prompt):
    max_tokens: int = Field(ge=1, le=MAX_TOKENS)
    stream: StrictBool | None = False
    metadata: MessagesMetadata | None = None
    stop_sequences: Any = None
    temperature: Any = None
    top_k: Any = None
    top_p: Any = None


class CountTokensRequest(Prompt):
    """`messages.count_tokens`: the prompt alone (vLLM counts it as it would render it)."""


def error_envelope(status: int, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": ERROR_TYPES.get(status, "api_error"),
                                       "message": message}}


def usage_of(payload: dict[str, Any]) -> dict[str, int] | None:
    """A Messages answer's or event's usage, as the gateway records it (prompt and
    completion tokens); None when it carries none."""
    usage = payload.get("usage")
    if not isinstance(usage, dict):
        message = payload.get("message")
        usage = message.get("usage") if isinstance(message, dict) else None
    if not isinstance(usage, dict):
        return None
    out: dict[str, int] = {}
    for theirs, ours in (("input_tokens", "prompt_tokens"),
                         ("output_tokens", "completion_tokens")):
        value = usage.get(theirs)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            out[ours] = value
    return out or None
