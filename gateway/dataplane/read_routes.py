"""The read-only routes beside the inference APIs: `/models`, the account listing
(Fireworks' control-plane shape: controlplane/listing.py) and the stored responses
(`GET/DELETE /responses/{id}`). A FastAPI router, off the hot path (request.py)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request

from gateway.controlplane import listing
from gateway.controlplane.registry import Account
from gateway.dataplane.parts import Gateway
from gateway.errors import GatewayError
from gateway.server.client import api_key

router = APIRouter()


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
    for found in registry.visible_routers(account):
        data.append({"id": found.name, "object": "model", "owned_by": found.account,
                     "created": created, "kind": "ROUTER", "supports_chat": True,
                     "parent": found.model})
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


@router.get("/accounts/{account_id}/routers")
async def account_routers(request: Request, account_id: str,
                          page_size: int | None = PageSize,
                          page_token: str | None = PageToken) -> dict[str, Any]:
    registry = request.app.state.gateway.store.current
    return listing.page(listing.routers_of(registry, authenticate(request), account_id),
                        "routers", page_size, page_token)


@router.get("/accounts/{account_id}/routers/{router_id}")
async def account_router(request: Request, account_id: str, router_id: str) -> dict[str, Any]:
    registry = request.app.state.gateway.store.current
    return listing.router_of(registry, authenticate(request), account_id, router_id)


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
