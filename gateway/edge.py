"""The gateway's edge: what a client can make the gateway hold before it is known.

Two layers, both configured by the Settings the app was built with (docs/operations.md,
"Limits at the edge"):
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
The inference routes read their body with `read_body` after checking the account's key.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import logging
import resource
from collections.abc import Iterable, Mapping
from typing import Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.config import Settings
from gateway.errors import GatewayError, error_envelope, send_error

logger = logging.getLogger("gateway.edge")
ADMIN_PATHS = ("/admin/", "/metrics")
CLOSE = {"connection": "close"}


def header_map(raw: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    # ASGI servers give header names in lower case.
    return {name.decode("latin-1"): value.decode("latin-1") for name, value in raw}


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


def too_large(settings: Settings) -> GatewayError:
    return GatewayError(413, f"The request body is larger than {settings.max_body_bytes} "
                             "bytes", headers=CLOSE)


def check_declared_length(headers: Mapping[str, str], settings: Settings) -> None:
    declared = headers.get("content-length", "")
    if declared.isdigit() and int(declared) > settings.max_body_bytes:
        raise too_large(settings)


async def read_body(receive: Receive, settings: Settings) -> bytes:
    """The request body, bounded in size (in time by EdgeProtocol). A client that leaves
    while sending it cancels the request (CancelledError: nothing was admitted)."""
    parts, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise asyncio.CancelledError
        body = message.get("body", b"")
        size += len(body)
        if size > settings.max_body_bytes:
            raise too_large(settings)
        parts.append(body)
        if not message.get("more_body", False):
            return parts[0] if len(parts) == 1 else b"".join(parts)


class Edge:
    """The admin gate and the body bounds for every route but the inference ones (which
    check the account's key first, then read the body with `read_body`)."""

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


def served_settings(app: Any) -> Settings:
    """The Settings the served app was built with (GatewayApp.settings), found through any
    middleware the server wrapped around it: one source of truth for both layers."""
    while app is not None:
        settings = getattr(app, "settings", None)
        if isinstance(settings, Settings):
            return settings
        app = getattr(app, "app", None)
    raise RuntimeError("EdgeProtocol serves the gateway's app (gateway.app:serve_app) only")


class EdgeProtocol(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol with a header deadline, a header size cap and a
    connection cap (uvicorn has none of these: a connection that never sends a whole
    request is otherwise held forever)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.edge = served_settings(self.app)
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

    def idle(self) -> bool:
        """No request in progress: waiting for one (a new or kept-alive connection)."""
        return self.cycle is None or self.cycle.response_complete

    def _await_headers(self) -> None:
        self.reading_headers = True
        self.header_bytes = 0
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
        if not self.reading_headers and (self.cycle is None or self.cycle.response_complete):
            self._await_headers()  # the first bytes of the next request on this connection
        super().data_received(data)
        if self.transport.is_closing():
            return
        if self.reading_headers:
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
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._headers_done()
        self._body_done()
        super().connection_lost(exc)


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
