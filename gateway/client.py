"""The client's side of one inference request, whichever way it came. The inference routes
(dataplane/routes.py) serve a `Client`: they read its headers and body, answer it, and learn
that it left; they never see how.

- `ConnectionClient`, the gateway's own path: EdgeProtocol (edge.py) hands a POST to an
  inference path straight to the routes, without an ASGI scope, messages or middleware. A
  whole reply is one write (status line, headers and body), a stream's headers go out with
  its first part, and the connection's loss cancels the request's task directly.
- `AsgiClient`, for everything else that speaks ASGI (another server, a pipelined request,
  the in-process test transport): the same requests, through ASGI messages.
"""

from __future__ import annotations

import asyncio
import http
import logging
import random
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Protocol

import orjson
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.flow_control import FlowControl

from gateway.config import Settings
from gateway.errors import GatewayError, error_headers

logger = logging.getLogger("gateway.client")
Headers = list[tuple[bytes, bytes]]


class Client(Protocol):
    @property
    def path(self) -> str: ...

    @property
    def headers(self) -> Mapping[str, str]:
        """Names in lower case."""

    @property
    def request_id(self) -> str: ...

    @property
    def gone(self) -> bool:
        """It left while watched, and the request's task was cancelled for that."""

    @property
    def responded(self) -> bool:
        """The reply began: an error can no longer be sent as a status."""

    async def read_body(self, settings: Settings) -> bytes:
        """The body, at most `max_body_bytes` (else 413); CancelledError if the client
        left while sending it."""

    def watch(self) -> None:
        """From now on the client leaving cancels the current task (and sets `gone`)."""

    def unwatch(self) -> None:
        """Call with no await since the reply's last write: a client leaving after the
        reply completed must not cancel anything."""

    async def whole(self, status: int, headers: Headers, body: bytes) -> None:
        """A complete reply (the content-length is added)."""

    async def begin(self, status: int, headers: Headers) -> None:
        """A streamed reply's status and headers; `part`s and one `last` follow."""

    async def part(self, body: bytes) -> None: ...

    async def last(self, body: bytes) -> None: ...


Serve = Callable[[Client], Awaitable[None]]


def request_id(given: str) -> str:
    """The client's x-request-id when it is short visible ASCII (it goes into logs, headers
    and error messages), else a new one."""
    if 0 < len(given) <= 128 and all("!" <= c <= "~" for c in given):
        return given
    # A version 4 UUID, formatted here (uuid.UUID costs several times more): random, not
    # uuid4's os.urandom, so no system call per request (seeded from the OS per process).
    h = "%032x" % (random.getrandbits(128) & UUID_RANDOM | UUID_V4)
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


UUID_V4 = (4 << 76) | (0b10 << 62)  # the version and variant bits
UUID_RANDOM = ~((0xF << 76) | (0b11 << 62)) & ((1 << 128) - 1)


def header_map(raw: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    # HTTP servers give header names in lower case.
    return {name.decode("latin-1"): value.decode("latin-1") for name, value in raw}


def too_large(settings: Settings) -> GatewayError:
    return GatewayError(413, f"The request body is larger than {settings.max_body_bytes} "
                             "bytes", headers={"connection": "close"})


STATUS_LINES = {status.value: b"HTTP/1.1 %d %s\r\n" % (status.value, status.phrase.encode())
                for status in http.HTTPStatus}


class ConnectionClient:
    """One request on one of EdgeProtocol's connections, served without ASGI.

    It stands in uvicorn's RequestResponseCycle for the protocol, which fills and reads the
    same attributes (`body`, `more_body`, `message_event`, `disconnected`, `keep_alive`,
    `response_started`, `response_complete`): pipelining, flow control, keep-alive and
    graceful shutdown stay uvicorn's."""

    def __init__(self, transport: asyncio.Transport, flow: FlowControl,
                 on_response: Callable[[], None], default_headers: Headers, path: str,
                 headers: dict[str, str], keep_alive: bool) -> None:
        self.transport, self.flow, self.on_response = transport, flow, on_response
        self.default_headers = default_headers  # the server's (date)
        self.path, self.headers = path, headers
        self.request_id = request_id(headers.get("x-request-id", ""))
        self.body = bytearray()
        self.more_body = True
        self.message_event = asyncio.Event()
        self.disconnected = False
        self.keep_alive = keep_alive
        self.response_started = False
        self.response_complete = False
        self.gone = False
        self.task: asyncio.Task[None] | None = None
        self._watching = False
        self._head = b""  # a stream's headers until its first part

    @property
    def responded(self) -> bool:
        return self.response_started  # (set by the first write: a held head is not)

    async def run(self, serve: Serve) -> None:
        """The request's task. The routes answer every request, errors included; what
        escapes them closes the connection rather than leave it half answered."""
        try:
            await serve(self)
        except asyncio.CancelledError:  # not the client's leaving: the server stops
            self.transport.close()
            raise
        except Exception:
            logger.exception("request %s: unexpected error", self.request_id)
            if not self.response_started:  # (the body may be unread: the connection ends)
                error = GatewayError(500, "Internal error", headers={"connection": "close"})
                await self.whole(500, error_headers(error),
                                 orjson.dumps(error.envelope(self.request_id)))
        finally:
            # The protocol keeps its last cycle until the next request: let it not keep
            # this task and itself alive through us (uvicorn's cycle does the same).
            self.on_response = _nothing
            self.task = None
        if not self.response_complete and not self.disconnected:
            logger.error("request %s: the reply was not completed", self.request_id)
            self.transport.close()

    def lost(self) -> None:
        """The connection closed (EdgeProtocol.connection_lost)."""
        if self._watching and not self.response_complete and self.task is not None:
            self.gone = True
            self.task.cancel()

    async def read_body(self, settings: Settings) -> bytes:
        limit = settings.max_body_bytes
        while self.more_body and not self.disconnected and len(self.body) <= limit:
            self.flow.resume_reading()  # the protocol pauses reading past 64 KiB
            await self.message_event.wait()
            self.message_event.clear()
        if self.disconnected:
            raise asyncio.CancelledError
        if len(self.body) > limit:
            raise too_large(settings)
        body, self.body = bytes(self.body), bytearray()
        return body

    def watch(self) -> None:
        self._watching = True
        # A connection's loss is seen only while it is read: the protocol stops reading past
        # 64 KiB of buffered body, and nothing else would start it again.
        self.flow.resume_reading()
        if self.disconnected:
            self.lost()

    def unwatch(self) -> None:
        self._watching = False

    async def whole(self, status: int, headers: Headers, body: bytes) -> None:
        self._head = b""  # (a stream's held head, if it failed before its first part)
        head = self._start(status, headers, b"content-length: %d\r\n" % len(body))
        await self._write(head + body, complete=True)

    async def begin(self, status: int, headers: Headers) -> None:
        self._head = self._start(status, headers, b"transfer-encoding: chunked\r\n")

    async def part(self, body: bytes) -> None:
        head, self._head = self._head, b""
        await self._write(head + b"%x\r\n%s\r\n" % (len(body), body) if body else head,
                          complete=False)

    async def last(self, body: bytes) -> None:
        head, self._head = self._head, b""
        chunk = b"%x\r\n%s\r\n" % (len(body), body) if body else b""
        await self._write(head + chunk + b"0\r\n\r\n", complete=True)

    def _start(self, status: int, headers: Headers, framing: bytes) -> bytes:
        if self.response_started:
            raise RuntimeError("the reply has already begun")
        lines = [STATUS_LINES.get(status) or b"HTTP/1.1 %d \r\n" % status]
        headers = self.default_headers + headers
        said_close = False
        for name, value in headers:
            if name == b"connection":  # (the gateway sends only `close`)
                self.keep_alive, said_close = False, True
            lines += (name, b": ", value, b"\r\n")
        lines += (b"x-request-id: ", self.request_id.encode(), b"\r\n", framing)
        count = len(headers) + 4  # lines: status, headers, x-request-id, framing, blank
        if not self.keep_alive and not said_close:
            lines.append(b"connection: close\r\n")
            count += 1
        lines.append(b"\r\n")
        head = b"".join(lines)
        # One line per header: a line break inside a name or value would split the reply.
        if head.count(b"\n") != count or head.count(b"\r") != count:
            raise ValueError("a reply header holds a line break")
        return head

    async def _write(self, data: bytes, complete: bool) -> None:
        if self.flow.write_paused and not self.disconnected:
            await self.flow.drain()
        if self.disconnected:
            return
        self.response_started = True
        self.transport.write(data)
        if complete:
            self.response_complete = True
            self.message_event.set()
            if not self.keep_alive:
                self.transport.close()
            self.on_response()


def _nothing() -> None:
    return None


class AsgiClient:
    """A request that came through ASGI; `scope["state"]["request_id"]` is set by
    app.RequestIdMiddleware, which also adds the x-request-id header to every reply."""

    def __init__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.path: str = scope["path"]
        self.headers = header_map(scope["headers"])
        self.request_id: str = scope["state"]["request_id"]
        self.receive, self.send = receive, send
        self.gone = False
        self.responded = False
        self._owner: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None

    async def read_body(self, settings: Settings) -> bytes:
        limit, parts, size = settings.max_body_bytes, [], 0
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise asyncio.CancelledError
            body = message.get("body", b"")
            size += len(body)
            if size > limit:
                raise too_large(settings)
            parts.append(body)
            if not message.get("more_body", False):
                return parts[0] if len(parts) == 1 else b"".join(parts)

    def watch(self) -> None:
        # ASGI servers say that the client left only on `receive` (a send to a closed
        # connection returns quietly): a task waits there.
        self._owner = asyncio.current_task()
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while (await self.receive())["type"] != "http.disconnect":
            pass
        if self._watcher is not None and self._owner is not None:
            self.gone = True
            self._owner.cancel()

    def unwatch(self) -> None:
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.cancel()

    async def whole(self, status: int, headers: Headers, body: bytes) -> None:
        self.responded = True
        await self.send({"type": "http.response.start", "status": status,
                         "headers": [*headers, (b"content-length", b"%d" % len(body))]})
        await self.send({"type": "http.response.body", "body": body})

    async def begin(self, status: int, headers: Headers) -> None:
        self.responded = True
        await self.send({"type": "http.response.start", "status": status, "headers": headers})

    async def part(self, body: bytes) -> None:
        if body:
            await self.send({"type": "http.response.body", "body": body, "more_body": True})

    async def last(self, body: bytes) -> None:
        await self.send({"type": "http.response.body", "body": body})
