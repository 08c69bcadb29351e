"""The inference routes: every API in the route table, served by one path.

`POST <prefix><api.path>` for every API object (app.py builds the table) is served by
`InferenceRoutes.serve`, for a `Client` (client.py): the gateway's server protocol hands
those requests over directly (`direct`), and as an ASGI app in front of FastAPI it serves
them for any other server. The hot path skips FastAPI's routing and dependency machinery,
and one place sees the whole request, so that a client leaving at any moment (while the
worker is asked, while headers are held for the first token, mid-stream, during a plain
request) cancels it, which closes the worker request. The rest (`/models`) is a FastAPI
router.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Iterable
from typing import Any

import orjson
from fastapi import APIRouter, Query, Request
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.api import InferenceApi
from gateway.client import AsgiClient, Client, Serve
from gateway.controlplane import listing
from gateway.controlplane.registry import Account, Route
from gateway.dataplane.affinity import affinity_key
from gateway.dataplane.exchange import Exchange
from gateway.dataplane.parts import Gateway
from gateway.dataplane.serving import admit, attempt_all, count_refusal
from gateway.edge import api_key, check_declared_length
from gateway.errors import GatewayError, error_headers, send_error
from gateway.validation import parse_body

logger = logging.getLogger("gateway.routes")
# Pins the deployment while the body keeps the model id (as `<model>#<deployment>` does).
DEPLOYMENT_HEADER = "fireworks-deployment"
router = APIRouter()


class InferenceRoutes:
    """POST <prefix><api.path> for every API and prefix; everything else goes on to `app`
    (FastAPI)."""

    def __init__(self, app: ASGIApp, gateway: Gateway, apis: Iterable[InferenceApi[Any]],
                 prefixes: Iterable[str]) -> None:
        self.app = app
        self.gateway = gateway
        apis = list(apis)
        self.paths = {prefix + api.path: api for prefix in prefixes for api in apis}
        # What EdgeProtocol serves without ASGI: a POST to any of these paths.
        self.direct: dict[str, Serve] = {
            path: functools.partial(self.serve, api=api) for path, api in self.paths.items()}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        api = self.paths.get(scope["path"]) if scope["type"] == "http" else None
        if api is None:
            await self.app(scope, receive, send)
        elif scope["method"] != "POST":
            await send_error(send, GatewayError(405, "Method not allowed",
                                                headers={"allow": "POST"}),
                             scope["state"]["request_id"])
        else:
            await self.serve(AsgiClient(scope, receive, send), api)

    async def serve(self, client: Client, api: InferenceApi[Any]) -> None:
        gateway, endpoint, request_id = self.gateway, api.worker_path, client.request_id
        # The key and the declared size are checked before the body is read: a client
        # without a key costs a bounded amount, whatever it sends.
        headers = client.headers
        trace = gateway.tracing.start(f"POST {client.path}", headers, request_id)
        try:
            account: Account = gateway.store.current.authenticate(api_key(headers))
            check_declared_length(headers, gateway.settings)
            raw = await client.read_body(gateway.settings)
        except asyncio.CancelledError:
            trace.end("aborted", 499, None)
            return  # the client left while sending its request
        except GatewayError as exc:
            trace.end("error", exc.status, None)
            count_refusal(gateway, "", endpoint, exc.status)
            exc.headers.setdefault("connection", "close")  # the body was not read
            await _send_error(client, exc, api)
            return
        exchange: Exchange | None = None
        route: Route | None = None
        error: GatewayError | None = None
        outcome = ("error", 500)  # unless a path below says otherwise
        client.watch()  # from here, a client that leaves cancels the request
        try:
            request: Any = parse_body(raw, api.request_model, gateway.settings)
            route = gateway.store.current.resolve(request.model, account,
                                                  headers.get(DEPLOYMENT_HEADER))
            trace.describe(account=account.id, deployment=route.deployment.name,
                           model=route.model)
            with trace.phase("admission"):
                exchange = await admit(gateway, api, account, route, request, request_id,
                                       trace)
            reply = await attempt_all(exchange, affinity_key(
                headers, api, request, gateway.settings.prefix_affinity_bytes))
            outcome = await reply.send(client)
        except asyncio.CancelledError:
            if not client.gone:
                raise
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
            outcome = ("aborted", 499)
        except GatewayError as exc:
            error, outcome = exc, ("error", exc.status)
        except Exception:
            logger.exception("request %s: unexpected error", request_id)
            error = GatewayError(500, "Internal error")
        finally:
            # The one place a request ends: no await since the last send (Client.unwatch).
            client.unwatch()
            if exchange is not None:
                exchange.end(*outcome)
            elif error is not None:
                count_refusal(gateway, route.deployment.name if route else "", endpoint,
                              error.status)
            trace.end(*outcome, exchange.first_token_at if exchange is not None else None)
        if error is not None:
            if error.status >= 500:
                logger.warning("request %s failed: %s %s", request_id, error.status,
                               error.message)
            if not client.responded:
                await _send_error(client, error, api)


async def _send_error(client: Client, error: GatewayError, api: InferenceApi[Any]) -> None:
    await client.whole(error.status, error_headers(error),
                       orjson.dumps(api.error_body(error, client.request_id)))


def authenticate(request: Request) -> Account:
    gateway: Gateway = request.app.state.gateway
    return gateway.store.current.authenticate(api_key(request.headers))


@router.get("/models")
async def models(request: Request) -> dict[str, Any]:
    account = authenticate(request)
    gateway: Gateway = request.app.state.gateway
    registry = gateway.store.current
    created = int(gateway.started_at)
    data: list[dict[str, Any]] = []
    seen: set[str] = set()
    for deployment in registry.visible_deployments(account):
        for model_id in (deployment.model, deployment.name):
            if model_id in seen:
                continue
            seen.add(model_id)
            entry = {"id": model_id, "object": "model", "owned_by": deployment.account,
                     "created": created, "kind": "HF_BASE_MODEL", "supports_chat": True,
                     "supports_tools": deployment.tool_parser is not None}
            if deployment.context_length is not None:  # legacy clients reject a null
                entry["context_length"] = deployment.context_length
            data.append(entry)
    for lora in registry.visible_loras(account):
        base = registry.base_of(lora)
        if base is not None:
            data.append({"id": lora.model, "object": "model", "owned_by": lora.account,
                         "created": created, "kind": "HF_PEFT_ADDON", "supports_chat": True,
                         "parent": base.model, "deployment": base.name})
    return {"object": "list", "data": data}


# The account listing (read-only, Fireworks' control-plane shape: controlplane/listing.py).
PageSize = Query(None, alias="pageSize")
PageToken = Query(None, alias="pageToken")


@router.get("/accounts/{account_id}/models")
async def account_models(request: Request, account_id: str, page_size: int | None = PageSize,
                         page_token: str | None = PageToken) -> dict[str, Any]:
    registry = request.app.state.gateway.store.current
    return listing.page(listing.models_of(registry, authenticate(request), account_id),
                        "models", page_size, page_token)


@router.get("/accounts/{account_id}/models/{model_id}")
async def account_model(request: Request, account_id: str, model_id: str) -> dict[str, Any]:
    registry = request.app.state.gateway.store.current
    return listing.model_of(registry, authenticate(request), account_id, model_id)


@router.get("/accounts/{account_id}/deployments")
async def account_deployments(request: Request, account_id: str,
                              page_size: int | None = PageSize,
                              page_token: str | None = PageToken) -> dict[str, Any]:
    registry = request.app.state.gateway.store.current
    return listing.page(listing.deployments_of(registry, authenticate(request), account_id),
                        "deployments", page_size, page_token)


# Stored responses (the Responses API's `store`): the account's own only; others 404.
@router.get("/responses/{response_id}")
async def get_response(request: Request, response_id: str) -> dict[str, Any]:
    account = authenticate(request)
    gateway: Gateway = request.app.state.gateway
    stored = await gateway.responses.load(account.id, response_id)
    if stored is None:
        raise GatewayError(404, f"Response {response_id} not found")
    return stored.response


@router.delete("/responses/{response_id}")
async def delete_response(request: Request, response_id: str) -> dict[str, Any]:
    account = authenticate(request)
    gateway: Gateway = request.app.state.gateway
    if not await gateway.responses.delete(account.id, response_id):
        raise GatewayError(404, f"Response {response_id} not found")
    return {"id": response_id, "object": "response", "deleted": True}
