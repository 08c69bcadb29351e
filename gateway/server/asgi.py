"""The gateway as an ASGI app, for every request the own protocol does not serve directly
(any other server, a pipelined request, the in-process test transport):

- `RequestIdMiddleware`: the client's x-request-id or a new one, on every reply;
- `InferenceRoutes`: a POST to an inference path goes to the data plane as an `AsgiClient`
  (the same requests as the own protocol's `ConnectionClient`, through ASGI messages);
  everything else goes on to the FastAPI app;
- `Edge`, in front of FastAPI: the admin key is checked (for `/admin/` and `/metrics`)
  before any byte of the body is read; a declared body over `max_body_bytes` is a 413
  before reading; a body is read at most to that limit. A refusal before the body was read
  closes the connection, so the rest of the body is never read.
- `GatewayApp`: what uvicorn serves, and what the own protocol finds its settings and its
  direct paths on.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Mapping

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.config import Settings
from gateway.errors import GatewayError, send_error
from gateway.server.client import (
    Headers,
    Serve,
    api_key,
    body_limit,
    check_declared_length,
    header_map,
    request_id,
    too_large,
)

ADMIN_PATHS = ("/admin/", "/metrics")
CLOSE = {"connection": "close"}


def check_admin_key(settings: Settings, given: str | None, path: str = "/admin/") -> None:
    """The admin key, or for /metrics also the metrics key."""
    if path.startswith("/metrics") and settings.metrics_key and hmac.compare_digest(
            (given or "").encode(), settings.metrics_key.encode()):
        return
    expected = settings.admin_key
    if not expected:
        raise GatewayError(401, "The admin API is disabled: set GATEWAY_ADMIN_KEY",
                           headers=CLOSE)
    if not hmac.compare_digest((given or "").encode(), expected.encode()):
        raise GatewayError(401, "Invalid admin key", headers=CLOSE)



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
        limit = body_limit(self.settings, scope["method"], scope["path"])
        try:
            if scope["path"].startswith(ADMIN_PATHS):
                check_admin_key(self.settings, api_key(headers), scope["path"])
            check_declared_length(headers, self.settings, limit)
        except GatewayError as exc:
            await send_error(send, exc, scope["state"]["request_id"])
            return
        await self.app(scope, self._bounded(receive, limit), send)

    def _bounded(self, receive: Receive, limit: int) -> Receive:
        size = 0

        async def bounded_receive() -> Message:
            nonlocal size
            message = await receive()
            size += len(message.get("body", b""))
            if size > limit:
                raise too_large(self.settings, limit)
            return message
        return bounded_receive



class AsgiClient:
    """A request that came through ASGI; `scope["state"]["request_id"]` is set by
    RequestIdMiddleware, which also adds the x-request-id header to every reply."""

    batch = None  # a client's own request, never a batch line

    def __init__(self, scope: Scope, receive: Receive, send: Send,
                 write_timeout: float = 5.0) -> None:
        self.write_timeout = write_timeout  # seconds a send may wait for the client to read
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
        await self._send({"type": "http.response.start", "status": status,
                          "headers": [*headers, (b"content-length", b"%d" % len(body))]})
        await self._send({"type": "http.response.body", "body": body})

    async def begin(self, status: int, headers: Headers) -> None:
        self.responded = True
        await self._send({"type": "http.response.start", "status": status,
                          "headers": headers})

    async def part(self, body: bytes) -> None:
        if body:
            await self._send({"type": "http.response.body", "body": body, "more_body": True})

    async def last(self, body: bytes) -> None:
        await self._send({"type": "http.response.body", "body": body})

    async def _send(self, message: Message) -> None:
        """A send that waits at most write_timeout for the client to read: past it the
        client is taken as gone (what its request holds goes to those who read)."""
        try:
            await asyncio.wait_for(self.send(message), self.write_timeout)
        except TimeoutError:
            if self._watcher is not None:  # (after the request's end: the reply is dropped)
                self.gone = True
                raise asyncio.CancelledError from None



class InferenceRoutes:
    """POST to each of `direct`'s paths is served by its `Serve` (the data plane); any
    other method there is a 405; everything else goes on to `app`."""

    def __init__(self, app: ASGIApp, direct: Mapping[str, Serve],
                 write_timeout: float = 5.0) -> None:
        self.app = app
        self.direct = direct
        self.write_timeout = write_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        serve = self.direct.get(scope["path"]) if scope["type"] == "http" else None
        if serve is None:
            await self.app(scope, receive, send)
        elif scope["method"] != "POST":
            await send_error(send, GatewayError(405, "Method not allowed",
                                                headers={"allow": "POST"}),
                             scope["state"]["request_id"])
        else:
            await serve(AsgiClient(scope, receive, send, self.write_timeout))


class RequestIdMiddleware:
    """Echo the client's x-request-id or make one; put it on every response.

    A plain ASGI middleware (not BaseHTTPMiddleware) so that streaming responses and client
    disconnects pass through untouched."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = ""
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                given = value.decode("latin-1")
                break
        rid = request_id(given)
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []),
                                      (b"x-request-id", rid.encode("latin-1"))]
            await send(message)

        await self.app(scope, receive, send_with_id)



class GatewayApp:
    """The ASGI app uvicorn serves; `.fastapi` is the app behind the inference routes (its
    state holds the Gateway, its router the lifespan); `.settings` what it was built with,
    which the server protocol (protocol.EdgeProtocol) reads too, and `.direct` the inference
    paths it serves without ASGI."""

    def __init__(self, app: ASGIApp, fastapi: FastAPI, settings: Settings,
                 direct: Mapping[str, Serve]) -> None:
        self.app = app
        self.fastapi = fastapi
        self.settings = settings
        self.direct = direct
        self.state = fastapi.state
        self.router = fastapi.router

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)

