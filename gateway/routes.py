"""The Fireworks inference routes. Each handler authenticates and validates; serving.py does
the rest."""

from __future__ import annotations

from typing import Any, TypeVar

import orjson
from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ValidationError

from gateway.config import Settings
from gateway.errors import GatewayError
from gateway.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    FieldError,
    known_fields,
)
from gateway.registry import Account
from gateway.serving import Gateway, count_refusal, serve

router = APIRouter()
RequestModel = TypeVar("RequestModel", bound=BaseModel)


def _location(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def validation_message(error: ValidationError) -> tuple[str, str | None]:
    """Fireworks' wording: `Extra inputs are not permitted, field: 'messages[1].reasoning'`."""
    first = error.errors(include_url=False)[0]
    # Union members add their type names to the location; keep only real field names.
    loc = tuple(p for p in first["loc"]
                if isinstance(p, int) or (not any(c in str(p) for c in "[]-")
                and str(p) not in {"str", "int", "float", "bool", "list", "dict"}))
    field = _location(loc) or None
    cause = (first.get("ctx") or {}).get("error")
    if field is None and isinstance(cause, FieldError):
        field = cause.field
    message = first["msg"].removeprefix("Value error, ")
    return (f"{message}, field: '{field}'" if field else message), field


async def parse_body(request: Request, model: type[RequestModel],
                     settings: Settings) -> RequestModel:
    try:
        payload = orjson.loads(await request.body())
    except orjson.JSONDecodeError as exc:
        raise GatewayError(400, f"Request body is not valid JSON: {exc}") from exc
    if not isinstance(payload, dict):
        raise GatewayError(400, "Request body must be a JSON object")
    if not settings.strict_validation:
        allowed = known_fields(model)
        payload = {key: value for key, value in payload.items() if key in allowed}
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        message, field = validation_message(exc)
        raise GatewayError(400, message, param=field) from exc


def api_key(request: Request) -> str | None:
    authorization = request.headers.get("authorization", "")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.headers.get("x-api-key")


def authenticate(request: Request) -> Account:
    gateway: Gateway = request.app.state.gateway
    return gateway.store.current.authenticate(api_key(request))


async def _serve(request: Request, model: type[ChatCompletionRequest | CompletionRequest],
                 path: str) -> Response:
    gateway: Gateway = request.app.state.gateway
    try:
        account = authenticate(request)
        body = await parse_body(request, model, gateway.settings)
        return await serve(gateway, request, account, body, path)
    except GatewayError as exc:
        count_refusal(gateway, request, "", path, exc.status)
        raise


@router.post("/chat/completions")
async def chat_completions(request: Request) -> Response:
    return await _serve(request, ChatCompletionRequest, "/v1/chat/completions")


@router.post("/completions")
async def completions(request: Request) -> Response:
    return await _serve(request, CompletionRequest, "/v1/completions")


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
    return {"object": "list", "data": data}
