"""The Fireworks inference routes. Each handler: authenticate, validate, resolve, relay."""

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
    prompts_of,
)
from gateway.registry import Account, Registry
from gateway.relay import Call, relay_json, relay_stream
from gateway.routing import ReplicaSet
from gateway.tokens import TokenTexts
from gateway.translate import chat_body, completion_body
from gateway.upstream import WorkerClient

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
    registry: Registry = request.app.state.registry
    return registry.authenticate(api_key(request))


async def check_context(texts: TokenTexts, worker_url: str, body: dict[str, Any],
                        max_tokens: int, param: str) -> None:
    """context_length_exceeded_behavior=error: 400 naming both numbers when a prompt and
    max_tokens do not fit. (truncate needs nothing: the worker lowers max_tokens itself.)"""
    if "messages" in body:
        queries = [{"messages": body["messages"], "add_generation_prompt": True}]
    else:
        queries = [{"prompt": p} for p in prompts_of(body["prompt"])]
    for query in queries:
        prompt = query.get("prompt")
        if isinstance(prompt, list):  # token ids: their number is the length
            counted = await texts.tokenize(worker_url, {"prompt": ""})
            counted["count"] = len(prompt)
        else:
            counted = await texts.tokenize(worker_url, query)
        count, context = int(counted["count"]), int(counted["max_model_len"])
        if count + max_tokens > context:
            raise GatewayError(400, f"The prompt is {count} tokens and max_tokens is "
                                    f"{max_tokens}, which exceeds the context length of "
                                    f"{context} tokens", param=param)


async def _serve(request: Request, model: type[ChatCompletionRequest | CompletionRequest],
                 path: str) -> Response:
    state = request.app.state
    settings: Settings = state.settings
    account = authenticate(request)
    body = await parse_body(request, model, settings)
    route = state.registry.resolve(body.model, account)
    if isinstance(body, ChatCompletionRequest):
        worker_body, plan = chat_body(body, route.deployment, settings)
        fragments: list[Any] = [m.content for m in body.messages]
    else:
        worker_body, plan = completion_body(body, route.deployment, settings)
        fragments = body.prompt if isinstance(body.prompt, list) else [body.prompt]
    replicas: ReplicaSet = state.replicas
    lease = replicas.acquire(route.deployment)
    texts: TokenTexts = state.token_texts
    call = Call(
        route=route, lease=lease, request_id=request.state.request_id, path=path,
        body=worker_body, plan=plan, prompt_fragments=fragments,
        include_usage=body.stream_options.include_usage if body.stream_options else None,
        perf_metrics_in_response=bool(body.perf_metrics_in_response),
    )
    try:
        if body.context_length_exceeded_behavior == "error":
            param = "max_tokens" if body.max_tokens is not None else "max_completion_tokens"
            await check_context(texts, call.worker_url, worker_body, plan.max_tokens, param)
        if plan.echo and plan.chat:
            plan.echo_texts = [await texts.rendered_chat_prompt(call.worker_url,
                                                                worker_body["messages"])]
        elif plan.echo:
            plan.echo_texts = await texts.echo_texts(call.worker_url, worker_body["prompt"],
                                                     plan.echo_last)
    except BaseException:
        lease.release()
        raise
    client: WorkerClient = state.workers
    if body.stream:
        return await relay_stream(client, texts, call)
    return await relay_json(client, texts, call)


@router.post("/chat/completions")
async def chat_completions(request: Request) -> Response:
    return await _serve(request, ChatCompletionRequest, "/v1/chat/completions")


@router.post("/completions")
async def completions(request: Request) -> Response:
    return await _serve(request, CompletionRequest, "/v1/completions")


@router.get("/models")
async def models(request: Request) -> dict[str, Any]:
    account = authenticate(request)
    registry: Registry = request.app.state.registry
    created = int(request.app.state.started_at)
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
