"""Anthropic's Messages protocol: what the gateway reads of a request, its error envelope,
and the usage in its answers and events (pure; the API object is api.py).

The gateway validates what it needs (the model, `max_tokens`, `messages`, `stream`) and
leaves the rest to the worker, whose 400s pass through in Anthropic's shape.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool

from gateway.api import MAX_TOKENS

# status -> Anthropic's error type
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
               403: "permission_error", 404: "not_found_error", 408: "timeout_error",
               413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error",
               504: "timeout_error"}


class MessagesRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int = Field(ge=1, le=MAX_TOKENS)
    messages: list[dict[str, Any]] = Field(min_length=1)
    stream: StrictBool | None = False


class CountTokensRequest(BaseModel):
    """`messages.count_tokens`: a Messages request without `max_tokens` or `stream`."""

    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[dict[str, Any]] = Field(min_length=1)


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
