"""Relaying a worker's answer to the client (the I/O around fireworks/answer.py and
fireworks/stream.py).

Non-streaming: the body is read whole, checked, reshaped, sent with fireworks-* headers.
Streaming: the worker's stream is read up to its first token while the client's headers are
held, so that anything wrong up to there is a real status (and may be retried on another
replica). After that the chunks are relayed as they arrive, several in one write when they
arrived together; a failure after the first byte becomes the held chunks, then
`event: error` with the Fireworks envelope, then `data: [DONE]`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import orjson
from starlette.types import Send

from gateway.dataplane.exchange import Attempt, Exchange
from gateway.dataplane.tokens import TokenTexts
from gateway.dataplane.workers import DONE as WORKER_DONE
from gateway.dataplane.workers import WorkerAnswer
from gateway.errors import GatewayError, stream_error_event
from gateway.fireworks.answer import shape_completion
from gateway.fireworks.choices import token_ids_in
from gateway.fireworks.perf import metric_headers, perf_metrics
from gateway.fireworks.stream import DONE, StreamReframer, carries_token
from gateway.fireworks.worker_answer import WorkerFault, check_chunk, check_completion

logger = logging.getLogger("gateway.relay")
# A worker answer that breaks the shaping code is a malformed answer, not a gateway bug.
SHAPE_ERRORS = (KeyError, TypeError, ValueError, AttributeError, IndexError)
STREAM_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"),
                  (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]


def admission_headers(exchange: Exchange) -> list[tuple[bytes, bytes]]:
    """The account's rate-limit headers, on every answer of a limited account."""
    return [(k.encode(), v.encode()) for k, v in exchange.admission.headers.items()]


def _headers(exchange: Exchange, metrics: dict[str, Any]) -> list[tuple[bytes, bytes]]:
    deployment = exchange.route.deployment
    return [(k.encode(), v.encode("latin-1", "replace")) for k, v in metric_headers(
        metrics, exchange.plan.sampling_options, deployment.context_length).items()] + \
        admission_headers(exchange)


async def _vocabulary(texts: TokenTexts, exchange: Exchange, attempt: Attempt,
                      payload: dict[str, Any]) -> dict[int, str]:
    if not exchange.plan.logprobs:
        return {}
    ids: set[int] = set()
    for choice in payload["choices"]:
        ids |= token_ids_in(choice.get("logprobs"))
    return await texts.texts(exchange.route.deployment.model, attempt.worker_url, ids)


def expect_type(answer: WorkerAnswer, content_type: str) -> None:
    if answer.content_type != content_type:
        raise WorkerFault(f"content-type {answer.content_type!r}, expected {content_type!r}")


def parse_json(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise WorkerFault(f"not JSON: {raw[:200]!r}") from exc


class PlainAnswer:
    """A complete non-streaming answer, sent as one body."""

    def __init__(self, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        self.status, self.body, self.headers = status, body, headers

    async def send(self, send: Send) -> tuple[str, int]:
        await send({"type": "http.response.start", "status": self.status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(self.body)).encode()),
                                *self.headers]})
        await send({"type": "http.response.body", "body": self.body})
        return "ok", self.status


async def relay_json(exchange: Exchange, attempt: Attempt, texts: TokenTexts) -> PlainAnswer:
    answer = attempt.answer
    assert answer is not None
    expect_type(answer, "application/json")
    data = check_completion(parse_json(await answer.read()), exchange.plan.chat)
    exchange.first_token()
    try:
        vocabulary = await _vocabulary(texts, exchange, attempt, data)
        out, usage, engine = shape_completion(data, exchange.plan,
                                              exchange.route.requested_model, vocabulary,
                                              exchange.echo_texts)
    except SHAPE_ERRORS as exc:
        raise WorkerFault(f"malformed answer: {exc!r}") from exc
    exchange.usage = usage
    metrics = perf_metrics(attempt.served, usage, engine, complete=True)
    if exchange.plan.perf_metrics_in_response:
        out["perf_metrics"] = metrics
    return PlainAnswer(200, orjson.dumps(out), _headers(exchange, metrics))


async def relay_embeddings(exchange: Exchange, attempt: Attempt) -> PlainAnswer:
    """An /embeddings answer: a list of vectors (float lists, or base64 strings)."""
    answer = attempt.answer
    assert answer is not None
    expect_type(answer, "application/json")
    data = parse_json(await answer.read())
    items = data.get("data") if isinstance(data, dict) else None
    if not isinstance(items, list) or not all(
            isinstance(i, dict) and isinstance(i.get("embedding"), (list, str)) for i in items):
        raise WorkerFault(f"not an embedding list: {str(data)[:200]}")
    exchange.first_token()
    exchange.usage = data.get("usage")
    data["model"] = exchange.route.requested_model
    return PlainAnswer(200, orjson.dumps(data), admission_headers(exchange))


class Relay:
    """One stream's way from the worker's events to Fireworks chunks (with the worker's
    token texts when logprobs need them)."""

    def __init__(self, exchange: Exchange, attempt: Attempt, texts: TokenTexts) -> None:
        self.exchange = exchange
        self.attempt = attempt
        self.texts = texts
        served = attempt.served
        self.reframer = StreamReframer(
            exchange.plan, exchange.route.requested_model,
            lambda usage, engine, complete: perf_metrics(served, usage, engine, complete),
            exchange.echo_texts)
        self.chat = exchange.plan.chat
        self.produced = False  # the engine produced something: a token, a finish, usage
        self.done = False  # [DONE] came

    async def reframe(self, payloads: list[bytes]) -> list[bytes]:
        parts: list[bytes] = []
        for raw in payloads:
            if raw == WORKER_DONE:
                parts += self.reframer.end()
                self.done = True
                break
            chunk = check_chunk(parse_json(raw), self.chat)
            if not self.produced and (not chunk["choices"] or carries_token(chunk)):
                self.produced = True
                self.exchange.first_token()
            try:
                texts = await _vocabulary(self.texts, self.exchange, self.attempt, chunk) \
                    if self.exchange.plan.logprobs else None
                parts += self.reframer.chunk(chunk, texts)
            except SHAPE_ERRORS as exc:
                raise WorkerFault(f"malformed chunk: {exc!r}") from exc
            self.exchange.usage = self.reframer.raw_usage
        return parts


class StreamAnswer:
    """A stream whose headers are ready: the chunks read so far, then the rest."""

    def __init__(self, relay: Relay, events: AsyncIterator[list[bytes]], held: list[bytes],
                 headers: list[tuple[bytes, bytes]]) -> None:
        self.relay, self.events, self.held, self.headers = relay, events, held, headers

    async def send(self, send: Send) -> tuple[str, int]:
        """Send the stream; how it ended."""
        exchange, relay = self.relay.exchange, self.relay
        await send({"type": "http.response.start", "status": 200,
                    "headers": STREAM_HEADERS + self.headers})
        try:
            parts = self.held
            while not relay.done:
                if parts:
                    await send({"type": "http.response.body", "body": b"".join(parts),
                                "more_body": True})
                parts = await relay.reframe(await anext(self.events))
            await send({"type": "http.response.body", "body": b"".join([*parts, DONE])})
        except GatewayError as exc:
            if isinstance(exc, WorkerFault):
                logger.warning("request %s: worker %s failed mid-stream: %s",
                               exchange.request_id, relay.attempt.worker_url, exc.detail)
            error = stream_error_event(exc.status,
                                       f"{exc.message} (request {exchange.request_id})",
                                       relay.reframer.response_id or exchange.request_id)
            await send({"type": "http.response.body",
                        "body": b"".join([*relay.reframer.drain(), error])})
            return "error", exc.status
        return "ok", 200


async def open_stream(exchange: Exchange, attempt: Attempt, texts: TokenTexts) -> StreamAnswer:
    """Read the worker's stream up to its first token. Failures up to here raise (nothing
    reached the client, so the request may be retried elsewhere)."""
    answer = attempt.answer
    assert answer is not None
    expect_type(answer, "text/event-stream")
    relay = Relay(exchange, attempt, texts)
    events = answer.events()
    held: list[bytes] = []
    while not (relay.produced or relay.done):
        held += await relay.reframe(await anext(events))
    metrics = perf_metrics(attempt.served, relay.reframer.last_usage, None, complete=False)
    return StreamAnswer(relay, events, held, _headers(exchange, metrics))


