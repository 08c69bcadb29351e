"""Relaying a worker's answer to the client as its reply, for every API.

Non-streaming: the body is read whole (bounded), and the API's Call checks and reshapes it.
Streaming: one loop for every API. The worker's stream is read, event by event through the
API's framing, until the framing is ready (the engine produced something) while the client's
headers are held, so that anything wrong up to there is a real status (and may be retried on
another replica). After that the events are relayed as they arrive, several in one write
when they arrived together; a failure after the first byte is continued on another worker
when the request's life can (`resume`: request.py's migration), and otherwise becomes what
the framing held back, then the API's error event.

Nothing here reaches into the request's life: the API's Call reports the first token and
the usage into the attempt's `Served`, which request.py reads at the end.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from gateway.api import Call, Served, StreamFraming, Worker
from gateway.dataplane.workers import WorkerAnswer
from gateway.errors import GatewayError, WorkerFault
from gateway.server.client import Client, Headers

logger = logging.getLogger("gateway.relay")
STREAM_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"),
                  (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
Events = AsyncIterator[list[tuple[str, bytes]]]


def expect_type(answer: WorkerAnswer, content_type: str) -> None:
    if answer.content_type != content_type:
        raise WorkerFault(f"content-type {answer.content_type!r}, expected {content_type!r}")


class PlainReply:
    """A complete non-streaming reply, sent as one body."""

    def __init__(self, status: int, body: bytes, headers: Headers) -> None:
        self.status, self.body, self.headers = status, body, headers

    async def send(self, client: Client) -> tuple[str, int]:
        """Send it; how the request ended."""
        await client.whole(self.status, [(b"content-type", b"application/json"),
                                         *self.headers], self.body)
        return "ok", self.status


async def read_plain(answer: WorkerAnswer, call: Call, worker: Worker, served: Served,
                     headers: Headers) -> PlainReply:
    """The worker's whole answer, checked and reshaped by the API's call."""
    expect_type(answer, "application/json")
    reply = await call.reply(await answer.read(), worker, served)
    return PlainReply(200, reply.body, reply.headers + headers)


# After the worker failed mid-stream: another worker's answer that continues the stream
# (request.py's migration), or None.
Resume = Callable[[GatewayError], Awaitable[WorkerAnswer | None]]


async def _no_resume(exc: GatewayError) -> WorkerAnswer | None:
    return None


class HeldStream:
    """A stream whose headers are ready: what was read while they were held, then the
    rest; when its worker fails, what `resume` gives reads on as the rest of it."""

    def __init__(self, answer: WorkerAnswer, framing: StreamFraming, events: Events,
                 held: list[bytes], headers: Headers, request_id: str,
                 resume: Resume = _no_resume) -> None:
        self.answer, self.framing, self.events = answer, framing, events
        self.held, self.headers, self.request_id = held, headers, request_id
        self.resume = resume

    async def send(self, client: Client) -> tuple[str, int]:
        """Send the stream; how the request ended."""
        framing = self.framing
        await client.begin(200, STREAM_HEADERS + self.headers)
        parts = self.held
        while True:
            try:
                while not framing.done:
                    if parts:
                        await client.part(b"".join(parts))
                        parts = []
                    parts = await framing.take(await anext(self.events))
                # Read the end of the body before the last send (no await may follow it:
                # Client.unwatch), so that the connection goes back to the pool.
                await self.answer.finish()
                await client.last(b"".join(parts))
                return "ok", 200
            except GatewayError as exc:
                if isinstance(exc, WorkerFault):
                    logger.warning("request %s: worker %s failed mid-stream: %s",
                                   self.request_id, self.answer.url, exc.detail)
                if framing.done:  # its end failed to read: as before, nothing more
                    answer, parts = None, []
                else:
                    answer = await self.resume(exc)
                if answer is None:
                    await client.last(b"".join([*parts, *framing.drain(),
                                                framing.error_event(exc, self.request_id)]))
                    return "error", exc.status
                self.answer, self.events = answer, answer.events()


async def open_stream(answer: WorkerAnswer, framing: StreamFraming, headers: Headers,
                      request_id: str, resume: Resume = _no_resume) -> HeldStream:
    """Read the worker's stream until the framing is ready. Failures up to here raise
    (nothing reached the client, so the request may be retried elsewhere)."""
    expect_type(answer, "text/event-stream")
    events = answer.events()
    held: list[bytes] = []
    while not (framing.ready or framing.done):
        held += await framing.take(await anext(events))
    return HeldStream(answer, framing, events, held, framing.headers() + headers,
                      request_id, resume)
