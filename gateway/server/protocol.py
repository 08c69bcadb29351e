"""The gateway's own HTTP/1.1 server protocol: the only module that touches uvicorn's
internals (its httptools protocol, its private request cycle, its flow control). What it
relies on is named in tests/unit/server/test_uvicorn_contract.py, which fails by name when
a uvicorn release changes it; pyproject.toml pins uvicorn to the range that test has passed.

- `EdgeProtocol`, uvicorn's httptools protocol plus bounds: a request's headers must arrive
  within `header_timeout` and fit in `max_header_bytes`, its body within `body_timeout` after
  them (else 408 or 431, and the connection closes); a connection idle between requests
  closes after `keep_alive_timeout` (uvicorn's own timer); connections beyond
  `max_connections` (or what the open-files limit leaves) close the connection idle longest,
  or are closed as they come when all are busy. (Timers live here, not in the ASGI layer, so
  that the common request, whose body came with its headers, arms none.)
- A POST to an inference path is not given to the ASGI app: `EdgeProtocol` hands it to the
  data plane directly, as a `ConnectionClient`, with the same deadlines. A whole reply is one
  write (status line, headers and body), a stream's headers go out with its first part, and
  the connection's loss cancels the request's task directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import http
import logging
import resource
from collections.abc import Callable, Mapping
from typing import Any

import httptools
import orjson
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.config import Settings
from gateway.errors import GatewayError, error_envelope, error_headers
from gateway.server.client import Headers, Serve, header_map, request_id, too_large

logger = logging.getLogger("gateway.server")


STATUS_LINES = {status.value: b"HTTP/1.1 %d %s\r\n" % (status.value, status.phrase.encode())
                for status in http.HTTPStatus}



class ConnectionClient:
    """One request on one of EdgeProtocol's connections, served without ASGI.

    It stands in uvicorn's RequestResponseCycle for the protocol, which fills and reads the
    same attributes (`body`, `more_body`, `message_event`, `disconnected`, `keep_alive`,
    `response_started`, `response_complete`): pipelining, flow control, keep-alive and
    graceful shutdown stay uvicorn's."""

    batch = None  # a client's own request, never a batch line

    def __init__(self, transport: asyncio.Transport, flow: FlowControl,
                 on_response: Callable[[], None], default_headers: Headers, path: str,
                 headers: dict[str, str], keep_alive: bool, write_timeout: float) -> None:
        self.transport, self.flow, self.on_response = transport, flow, on_response
        self.write_timeout = write_timeout  # seconds a write may wait for the client to read
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
        if self._watching and not self.gone and not self.response_complete \
                and self.task is not None:
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
            try:
                await asyncio.wait_for(self.flow.drain(), self.write_timeout)
            except TimeoutError:
                self._cut_off()
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


    def _cut_off(self) -> None:
        """The client read nothing for write_timeout: it is taken as gone, so that what its
        request holds (worker request, replica, slot) goes to those who read. The
        connection is aborted (closing would wait to flush to a client that never reads)."""
        logger.info("request %s: the client read nothing for %g s: cut off",
                    self.request_id, self.write_timeout)
        self.disconnected = True
        self.transport.abort()
        if self._watching and self.task is not None:
            self.gone = True
            raise asyncio.CancelledError  # as when the connection is lost (`lost`)


def _nothing() -> None:
    return None



def _served(app: Any) -> Any:
    """The gateway's app (GatewayApp), found through any middleware the server wrapped
    around it."""
    while app is not None:
        if isinstance(getattr(app, "settings", None), Settings):
            return app
        app = getattr(app, "app", None)
    raise RuntimeError("EdgeProtocol serves the gateway's app (gateway.app:serve_app) only")



def served_settings(app: Any) -> Settings:
    """The Settings the served app was built with (GatewayApp.settings): one source of
    truth for both layers."""
    settings: Settings = _served(app).settings
    return settings



def served_directly(app: Any) -> Mapping[str, Serve]:
    """The paths whose POSTs the app serves without ASGI (GatewayApp.direct), and how."""
    direct: Mapping[str, Serve] = getattr(_served(app), "direct", {})
    return direct



class EdgeProtocol(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol with a header deadline, a header size cap and a
    connection cap (uvicorn has none of these: a connection that never sends a whole
    request is otherwise held forever)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.edge = served_settings(self.app)
        self.direct = served_directly(self.app)
        self.header_bytes = 0
        self.reading_headers = False
        self.header_timer: asyncio.TimerHandle | None = None
        self.body_timer: asyncio.TimerHandle | None = None
        self.active_at = 0.0  # when the connection opened or its last request began

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        cap = connection_cap(self.edge.max_connections)
        if len(self.connections) > cap:
            # Make room by closing the connection idle longest (no request in progress), so
            # that idle clients cannot lock out a health probe or a real request.
            idle = [c for c in self.connections
                    if isinstance(c, EdgeProtocol) and c is not self and c.idle()]
            if not idle:
                logger.warning("connection refused: %d open, all busy; the limit is %d",
                               len(self.connections), cap)
                transport.abort()
                return
            min(idle, key=lambda c: c.active_at).transport.abort()
        self.active_at = self.loop.time()
        self._await_headers()
        self._arm_header_timer()  # a connection that sends nothing is held that long

    def idle(self) -> bool:
        """No request in progress: waiting for one (a new or kept-alive connection)."""
        return self.cycle is None or self.cycle.response_complete

    def _await_headers(self) -> None:
        self.reading_headers = True
        self.header_bytes = 0

    def _arm_header_timer(self) -> None:
        if self.header_timer is None:
            self.header_timer = self.loop.call_later(self.edge.header_timeout,
                                                     self._headers_late)

    def _headers_done(self) -> None:
        self.reading_headers = False
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def _headers_late(self) -> None:
        self.header_timer = None
        if self.reading_headers and not self.transport.is_closing():
            self._refuse(408, "The request headers did not arrive in time")

    def _body_late(self) -> None:
        self.body_timer = None
        cycle = self.cycle
        if cycle is None or not cycle.more_body or self.transport.is_closing():
            return
        if cycle.response_started:
            self.transport.close()
        else:  # the app waits on receive(): it sees the disconnect and answers nothing
            self._refuse(408, "The request body did not arrive in time")

    def _body_done(self) -> None:
        if self.body_timer is not None:
            self.body_timer.cancel()
            self.body_timer = None

    def _refuse(self, status: int, message: str) -> None:
        self._headers_done()
        self._body_done()
        reason = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}[status]
        body = orjson.dumps(error_envelope(status, message))
        self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\nconnection: close\r\n\r\n%s"
                             % (status, reason, len(body), body))
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        if not self.reading_headers and self.idle():
            # The first bytes of the next request on this connection. The deadline is armed
            # only if its headers did not all come with them (the common request arms none).
            self._await_headers()
        super().data_received(data)
        if self.transport.is_closing():
            return
        if self.reading_headers:
            self._arm_header_timer()
            self.header_bytes += len(data)
            if self.header_bytes > self.edge.max_header_bytes:
                self._refuse(431, "The request headers are too large")
        elif self.body_timer is None and self.cycle is not None and self.cycle.more_body \
                and not self.cycle.response_complete:
            # headers in, body still on its way
            self.body_timer = self.loop.call_later(self.edge.body_timeout, self._body_late)

    def on_message_complete(self) -> None:
        self._body_done()
        super().on_message_complete()

    def on_headers_complete(self) -> None:
        self._headers_done()
        self.active_at = self.loop.time()
        if not self._serve_directly():
            super().on_headers_complete()

    def _serve_directly(self) -> bool:
        """A POST to an inference path goes to the routes as a ConnectionClient, unless it
        needs what only uvicorn's cycle does (a pipelined request waits for the one before
        it; `expect: 100-continue`; an upgrade; uvicorn's own concurrency limit)."""
        if self.parser.get_method() != b"POST" or self.expect_100_continue \
                or self.limit_concurrency is not None or self.parser.should_upgrade() \
                or (self.cycle is not None and not self.cycle.response_complete):
            return False
        path = httptools.parse_url(self.url).path.decode("latin-1")
        serve = self.direct.get(path)
        if serve is None:
            return False
        client = ConnectionClient(
            self.transport, self.flow, self.on_response_complete,
            self.server_state.default_headers, path, header_map(self.headers),
            self.parser.get_http_version() != "1.0" and self.parser.should_keep_alive(),
            self.edge.client_write_timeout)
        self.cycle = client  # type: ignore[assignment]  # (it has what the protocol uses)
        client.task = task = self.loop.create_task(client.run(serve))
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._headers_done()
        self._body_done()
        super().connection_lost(exc)
        if isinstance(self.cycle, ConnectionClient):
            self.cycle.lost()



# Files a server process keeps besides its client connections and their worker connections:
# the listening socket, event loop, logs, Redis connections, health and load polls, KV-event
# subscriptions (a few per pod), DNS.
FILE_RESERVE = 128



@functools.cache
def connection_cap(configured: int) -> int:
    """Client connections one process may hold: `max_connections`, or fewer when the open
    files limit is lower, since each connection may need a worker connection of its own
    (half of what is left after the reserve each)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return configured
    return max(1, min(configured, (soft - FILE_RESERVE) // 2))



def raise_open_files_limit() -> None:
    """Every connection is a file descriptor: let the process use what the system allows
    (a soft limit of 1,024 would let idle connections starve real ones)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))

