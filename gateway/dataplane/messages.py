"""Relaying a worker's Messages API answer (gateway/anthropic.py) to the client.

The worker's answer is checked as every answer is: a plain one must be a JSON object of type
`message`; a stream must reach `message_start` before the client's headers are sent (so a
failure up to there is a real status, and may be retried on another replica), and must end
with `message_stop`. After the first byte a failure becomes Anthropic's `error` event. The
usage (input tokens from `message_start`, output tokens from `message_delta`) goes to the
request's usage record.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import orjson
from starlette.types import Send

from gateway.anthropic import error_envelope, usage_of
from gateway.dataplane.exchange import Attempt, Exchange
from gateway.dataplane.relay import (
    STREAM_HEADERS,
    PlainAnswer,
    admission_headers,
    expect_type,
    parse_json,
)
from gateway.dataplane.workers import WorkerAnswer, WorkerClient
from gateway.errors import GatewayError
from gateway.fireworks.worker_answer import WorkerFault

logger = logging.getLogger("gateway.messages")


class ServedModels:
    """The model name each worker serves (what the Messages API must name), asked once."""

    def __init__(self, client: WorkerClient) -> None:
        self.client = client
        self.names: dict[str, str] = {}

    async def of(self, worker_url: str) -> str:
        name = self.names.get(worker_url)
        if name is None:
            data = await self.client.get(worker_url + "/v1/models", 10.0)
            try:
                models = orjson.loads(data[1])["data"] if data and data[0] == 200 else []
                name = next(m["id"] for m in models if not m.get("parent"))
            except (orjson.JSONDecodeError, KeyError, TypeError, StopIteration) as exc:
                raise WorkerFault(f"{worker_url}/v1/models named no model") from exc
            self.names[worker_url] = name
        return name


def _checked(raw: bytes) -> dict[str, Any]:
    data = parse_json(raw)
    if not isinstance(data, dict):
        raise WorkerFault("a Messages answer that is not an object")
    return data


async def relay_message(exchange: Exchange, attempt: Attempt) -> PlainAnswer:
    answer = attempt.answer
    assert answer is not None
    expect_type(answer, "application/json")
    data = _checked(await answer.read())
    if data.get("type") != "message" or not isinstance(data.get("content"), list):
        raise WorkerFault(f"not a message: {str(data)[:200]}")
    exchange.first_token()
    exchange.usage = usage_of(data)
    data["model"] = exchange.route.requested_model
    return PlainAnswer(200, orjson.dumps(data), admission_headers(exchange))


def _event(name: str, payload: bytes) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + payload + b"\n\n"


class MessageStream:
    """A Messages stream whose headers are ready: the events read so far, then the rest."""

    def __init__(self, exchange: Exchange, events: AsyncIterator[list[tuple[str, bytes]]],
                 held: list[bytes]) -> None:
        self.exchange, self.events, self.held = exchange, events, held
        self.usage: dict[str, int] = dict(exchange.usage or {})
        self.done = False

    def take(self, batch: list[tuple[str, bytes]]) -> list[bytes]:
        """The batch's events as they go out; usage noted, the model renamed, errors
        raised."""
        parts = []
        for name, payload in batch:
            if name == "error":
                raise WorkerFault(f"the worker sent an error event: {payload[:300]!r}")
            if name in ("message_start", "message_delta"):
                event = _checked(payload)
                self.usage |= usage_of(event) or {}
                self.exchange.usage = dict(self.usage)
                if name == "message_start" and isinstance(event.get("message"), dict):
                    event["message"]["model"] = self.exchange.route.requested_model
                    payload = orjson.dumps(event)
            if name == "content_block_delta":
                self.exchange.first_token()
            self.done = self.done or name == "message_stop"
            parts.append(_event(name, payload))
        return parts

    async def send(self, send: Send) -> tuple[str, int]:
        await send({"type": "http.response.start", "status": 200,
                    "headers": STREAM_HEADERS + admission_headers(self.exchange)})
        try:
            parts = self.held
            while not self.done:
                if parts:
                    await send({"type": "http.response.body", "body": b"".join(parts),
                                "more_body": True})
                parts = self.take(await anext(self.events))
            await send({"type": "http.response.body", "body": b"".join(parts)})
        except GatewayError as exc:
            if isinstance(exc, WorkerFault):
                logger.warning("request %s: Messages stream failed: %s",
                               self.exchange.request_id, exc.detail)
            error = error_envelope(exc.status,
                                   f"{exc.message} (request {self.exchange.request_id})")
            await send({"type": "http.response.body",
                        "body": _event("error", orjson.dumps(error))})
            return "error", exc.status
        return "ok", 200


async def open_message_stream(exchange: Exchange, attempt: Attempt) -> MessageStream:
    """Read the worker's stream up to `message_start`; failures up to here raise (the
    request may be retried elsewhere)."""
    answer: WorkerAnswer | None = attempt.answer
    assert answer is not None
    expect_type(answer, "text/event-stream")
    events = answer.sse_events()
    stream = MessageStream(exchange, events, [])
    while not any(part.startswith(b"event: message_start") for part in stream.held):
        stream.held += stream.take(await anext(events))
        if stream.done:
            break
    return stream
