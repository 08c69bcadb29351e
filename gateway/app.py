"""The gateway application: wiring of settings, registry, workers and routes."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.config import Settings
from gateway.errors import GatewayError
from gateway.registry import Registry
from gateway.routes import router
from gateway.routing import ReplicaSet
from gateway.tokens import TokenTexts
from gateway.upstream import WorkerClient

logger = logging.getLogger("gateway")

# Every inference route is served under each of these (spec 1.1; the doubled forms are what
# the SDKs produce from common base URLs).
PREFIXES = ("/inference/v1", "/v1", "/inference/v1/v1", "/v1/v1")


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
        headers = dict(scope["headers"])
        request_id = headers.get(b"x-request-id", b"").decode("latin-1") or str(uuid.uuid4())
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []),
                                      (b"x-request-id", request_id.encode("latin-1"))]
            await send(message)

        await self.app(scope, receive, send_with_id)


def _error_response(request: Request, error: GatewayError) -> Response:
    request_id = getattr(request.state, "request_id", None)
    if error.status >= 500:
        logger.warning("request %s failed: %s %s", request_id, error.status, error.message)
    return Response(orjson.dumps(error.envelope(request_id)), status_code=error.status,
                    media_type="application/json", headers=error.headers)


def create_app(settings: Settings | None = None,
               worker_transport: httpx.AsyncBaseTransport | None = None) -> FastAPI:
    """The gateway. `worker_transport` replaces the network towards workers (tests)."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.workers = WorkerClient(settings.upstream_connect_timeout,
                                         settings.upstream_read_timeout, worker_transport)
        app.state.token_texts = TokenTexts(app.state.workers)
        try:
            yield
        finally:
            await app.state.workers.aclose()

    app = FastAPI(title="Fireworks-compatible gateway", lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    app.state.settings = settings
    app.state.registry = Registry.from_yaml(settings.registry_path, settings.keys_path)
    app.state.replicas = ReplicaSet()
    app.state.started_at = time.time()
    for prefix in PREFIXES:
        app.include_router(router, prefix=prefix)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.exception_handler(GatewayError)
    async def gateway_error(request: Request, exc: GatewayError) -> Response:
        return _error_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        return _error_response(request, GatewayError(400, str(exc)))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        message = {404: "Not found", 405: "Method not allowed"}.get(exc.status_code,
                                                                   str(exc.detail))
        return _error_response(request, GatewayError(exc.status_code, message))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        logger.exception("unhandled error")
        return _error_response(request, GatewayError(500, "Internal error"))

    app.add_middleware(RequestIdMiddleware)
    return app
