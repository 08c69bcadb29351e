"""The gateway's edge: what a client can make the gateway hold before it is known.

Two layers, both configured by the Settings the app was built with (docs/operations.md,
"Limits at the edge"), and the way in for inference requests:
- `EdgeProtocol`, the HTTP server protocol (uvicorn's httptools one plus bounds): a request's
  headers must arrive within `header_timeout` and fit in `max_header_bytes`, its body within
  `body_timeout` after them (else 408 or 431, and the connection closes); a connection idle
  between requests closes after `keep_alive_timeout` (uvicorn's own timer); connections
  beyond `max_connections` (or what the open-files limit leaves) close the connection idle
  longest, or are closed as they come when all are busy. (Timers live here, not in the ASGI
  layer, so that the common request, whose body came with its headers, arms none.)
- `Edge`, an ASGI layer: the admin key is checked (for `/admin/` and `/metrics`) before any
  byte of the body is read; a declared body over `max_body_bytes` is a 413 before reading; a
  body is read at most to that limit. A refusal before the body was read closes the
  connection, so the rest of the body is never read.
- A POST to an inference path is not given to the ASGI app: `EdgeProtocol` hands it to the
  routes directly, as a `ConnectionClient` (client.py), with the same deadlines; the routes
  check the account's key, then read the body within `max_body_bytes`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import logging
import resource
from collections.abc import Mapping
from typing import Any

import httptools
import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.client import ConnectionClient, Serve, header_map, too_large
from gateway.config import Settings
from gateway.errors import GatewayError, error_envelope, send_error

logger = logging.getLogger("gateway.edge")
ADMIN_PATHS = ("/admin/", "/metrics")
CLOSE = {"connection": "close"}


def api_key(headers: Mapping[str, str]) -> str | None:
    authorization = headers.get("authorization", "")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return headers.get("x-api-key")


def check_admin_key(settings: Settings, given: str | None) -> None:
    expected = settings.admin_key
    if not expected:
        raise GatewayError(401, "The admin API is disabled: set GATEWAY_ADMIN_KEY",
                           headers=CLOSE)
    if not hmac.compare_digest((given or "").encode(), expected.encode()):
        raise GatewayError(401, "Invalid admin key", headers=CLOSE)


def check_declared_length(headers: Mapping[str, str], settings: Settings) -> None:
    declared = headers.get("content-length", "")
    if declared.isdigit() and int(declared) > settings.max_body_bytes:
        raise too_large(settings)


class Edge:
    """The admin gate and the body bounds for every route but the inference ones (which
    check the account's key first, then read the body within the same bounds)."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = header_map(scope["headers"])
        try:
            if scope["path"].startswith(ADMIN_PATHS):
                check_admin_key(self.settings, api_key(headers))
            check_declared_length(headers, self.settings)
        except GatewayError as exc:
            await send_error(send, exc, scope["state"]["request_id"])
            return
        await self.app(scope, self._bounded(receive), send)

    def _bounded(self, receive: Receive) -> Receive:
        limit, size = self.settings.max_body_bytes, 0

        async def bounded_receive() -> Message:
            nonlocal size
            message = await receive()
            size += len(message.get("body", b""))
            if size > limit:
                raise too_large(self.settings)
            return message
        return bounded_receive


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
            self.parser.get_http_version() != "1.0" and self.parser.should_keep_alive())
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
