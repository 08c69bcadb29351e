"""The Messages API (`/inference/v1/messages`) as an inference API object.

vLLM serves the Messages API natively (`/v1/messages`), so the body goes to the worker as
the client sent it, with `model` replaced by the name the worker serves (or the LoRA
adapter's). The worker's answer is checked as every answer is: a plain one must be a JSON
object of type `message`; a stream's headers wait for `message_start` (so a failure up to
there is a real status, and may be retried on another replica), and it must end with
`message_stop`; after the first byte a failure becomes Anthropic's `error` event. The usage
(input tokens from `message_start`, output tokens from `message_delta`) goes to the usage
record.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson
from pydantic import BaseModel

from gateway.anthropic.protocol import (
    GATEWAY_ONLY,
    CountTokensRequest,
    MessagesRequest,
    error_envelope,
    usage_of,
)
from gateway.api import Api, Call, Framing, Reply, Served, Worker, worker_json
from gateway.config import Settings
from gateway.controlplane.registry import Route
from gateway.errors import GatewayError, WorkerFault
from gateway.sse import sse


def messages_body(request: MessagesRequest | CountTokensRequest) -> dict[str, Any]:
    """The worker request: the client's, as it is (the model is named per replica), less
    what only the gateway reads."""
    return request.model_dump(exclude_none=True, exclude=GATEWAY_ONLY)


def _object(raw: bytes, what: str) -> dict[str, Any]:
    data = worker_json(raw)
    if not isinstance(data, dict):
        raise WorkerFault(f"a Messages {what} that is not an object")
    return data


@dataclass(kw_only=True)
class AnthropicCall(Call):
    """What Anthropic's calls share: the body as the client sent it, the model named per
    replica. (No cache_query: Anthropic messages are not what /tokenize renders.)"""

    model: str  # the Fireworks id the client asked for, which answers carry
    adapter: bool  # a LoRA adapter: the body already names it

    def prefix_material(self, limit: int) -> bytes | None:
        """The system prompt, the tools and the first turn."""
        body = self.body
        return orjson.dumps([body.get("system"), body.get("tools"),
                             body["messages"][0]])[:limit]

    async def prepare(self, worker: Worker, encoded: bytes) -> bytes:
        if self.adapter:
            return encoded
        return orjson.dumps(self.body | {"model": await worker.served_model()})


@dataclass(kw_only=True)
class MessagesCall(AnthropicCall):
    def prompt_estimate(self) -> int:
        """About four characters per token of the messages' JSON, four per message."""
        messages = self.body["messages"]
        return len(orjson.dumps(messages)) // 4 + 4 * len(messages)

    async def reply(self, raw: bytes, worker: Worker, served: Served) -> Reply:
        data = _object(raw, "answer")
        if data.get("type") != "message" or not isinstance(data.get("content"), list):
            raise WorkerFault(f"not a message: {str(data)[:200]}")
        served.first_token()
        served.usage = usage_of(data)
        data["model"] = self.model
        return Reply(orjson.dumps(data), [])

    def framing(self, worker: Worker, served: Served) -> MessageFraming:
        return MessageFraming(self.model, served)


@dataclass
class MessageFraming(Framing):
    """Anthropic's named events, relayed as they come: the model renamed in
    `message_start`, usage noted, an `error` event from the worker a fault."""

    model: str
    served: Served
    ready: bool = False  # message_start came
    done: bool = False  # message_stop came
    usage: dict[str, int] = field(default_factory=dict)

    async def take(self, events: list[tuple[str, bytes]]) -> list[bytes]:
        parts = []
        for name, data in events:
            parts.append(self.event(name, data))
            if self.done:
                break
        return parts

    def event(self, name: str, data: bytes) -> bytes:
        if name == "error":
            raise WorkerFault(f"the worker sent an error event: {data[:300]!r}")
        if name in ("message_start", "message_delta"):
            event = _object(data, "event")
            self.usage |= usage_of(event) or {}
            self.served.usage = dict(self.usage)
            if name == "message_start" and isinstance(event.get("message"), dict):
                event["message"]["model"] = self.model
                data = orjson.dumps(event)
        if name == "content_block_delta":
            self.served.first_token()
        self.ready = self.ready or name == "message_start"
        self.done = name == "message_stop"
        return sse(data, name)

    def error_event(self, exc: GatewayError, request_id: str) -> bytes:
        error = error_envelope(exc.status, f"{exc.message} (request {request_id})")
        return sse(orjson.dumps(error), "error")


def affinity(request: MessagesRequest | CountTokensRequest) -> str | None:
    """The client's cache key, where it sent one (prompt_cache_key, user)."""
    for value in (request.prompt_cache_key, request.user):
        if isinstance(value, str) and value:
            return value
    return None


class AnthropicApi(Api):
    """What Anthropic's APIs share: the error envelope."""

    def error_body(self, exc: GatewayError, request_id: str) -> dict[str, Any]:
        return error_envelope(exc.status, exc.message)


class MessagesApi(AnthropicApi):
    path = "/messages"
    worker_path = "/v1/messages"
    request_model: type[BaseModel] = MessagesRequest

    def translate(self, request: MessagesRequest, route: Route, settings: Settings, *,
                  account: str, nonce: str) -> MessagesCall:
        return MessagesCall(
            body=messages_body(request), model=route.requested_model,
            adapter=route.lora is not None, stream=bool(request.stream),
            max_tokens=request.max_tokens, affinity=affinity(request))


@dataclass(kw_only=True)
class CountTokensCall(AnthropicCall):
    """The worker's own count (vLLM serves `/v1/messages/count_tokens`, rendering the
    messages, system prompt and tools with the model's chat template). Counting generates
    nothing and is recorded with no tokens; it is free (no prompt estimate)."""

    async def reply(self, raw: bytes, worker: Worker, served: Served) -> Reply:
        data = _object(raw, "count")
        count = data.get("input_tokens")
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise WorkerFault(f"not a token count: {str(data)[:200]}")
        served.first_token()
        return Reply(orjson.dumps({"input_tokens": count}), [])


class CountTokensApi(AnthropicApi):
    """`/messages/count_tokens`: Anthropic's `messages.count_tokens`."""

    path = "/messages/count_tokens"
    worker_path = "/v1/messages/count_tokens"
    request_model: type[BaseModel] = CountTokensRequest

    def translate(self, request: CountTokensRequest, route: Route, settings: Settings, *,
                  account: str, nonce: str) -> CountTokensCall:
        return CountTokensCall(body=messages_body(request), model=route.requested_model,
                               adapter=route.lora is not None, affinity=affinity(request))
