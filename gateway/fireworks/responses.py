"""The Responses API (`/inference/v1/responses`) as an inference API object.

The gateway keeps the conversation; the workers do the rest. vLLM serves `/v1/responses`,
but keeps earlier responses in one server process, so `previous_response_id` there finds a
response only on the worker that made it. Here the gateway stores every response made with
`store: true` (controlplane/responses.py: Redis, shared by every gateway replica), and sends
the worker a stateless request: `input` is the stored conversation, the previous response's
output items and the new input, `previous_response_id` is left out and `store` is false.
The worker renders that with the model's chat template, runs tools and structured outputs,
and answers (or streams) in the Responses shape; its answer is checked as every answer is,
renamed to the model the client asked for, stored, and relayed.

The response id is the gateway's, given to the worker as its `request_id`, so it is known
before the answer and unique across workers: `resp_`, the conversation's root (16 hex digits:
the first turn's own, carried on by each `previous_response_id`), then this request's record
id. The root is the affinity key of every later turn, so a conversation stays on the replica
that holds its prefix in cache.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, Field, StrictBool, field_validator

from gateway.api import (
    MAX_TOKENS,
    Api,
    Call,
    Framing,
    Reply,
    Served,
    Worker,
    coerce_usage,
    worker_json,
)
from gateway.config import Settings
from gateway.controlplane.registry import Route
from gateway.controlplane.responses import ResponseStore, StoredResponse
from gateway.errors import GatewayError, WorkerFault
from gateway.fireworks.perf import fireworks_headers, perf_metrics
from gateway.fireworks.protocol import Strict
from gateway.fireworks.sampling import PRIORITY, cache_scope
from gateway.sse import sse
from gateway.validation import FieldError, Metadata

logger = logging.getLogger("gateway.responses")
# Events that carry the whole response object (its model and previous id are renamed).
_RESPONSE_EVENTS = {"response.created", "response.in_progress", "response.completed",
                    "response.incomplete", "response.failed", "response.queued"}
_LAST_EVENTS = {"response.completed", "response.incomplete"}


class ResponsesRequest(Strict):
    """What Fireworks documents for `POST /responses`; every field takes effect (docs/
    fireworks-api.md, "Responses")."""

    model: str
    input: Annotated[str, Field(min_length=1)] | Annotated[list[dict[str, Any]],
                                                             Field(min_length=1)]

    @field_validator("input")
    @classmethod
    def _items(cls, value: str | list[dict[str, Any]]) -> str | list[dict[str, Any]]:
        if isinstance(value, list):
            for index, item in enumerate(value):
                check_item(item, f"input[{index}]")
        return value
    previous_response_id: Annotated[str, Field(min_length=1, max_length=200)] | None = None
    instructions: str | None = None
    max_output_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS)] | None = None
    metadata: Metadata | None = None
    parallel_tool_calls: StrictBool | None = None
    reasoning: dict[str, Any] | None = None
    store: StrictBool = True
    stream: StrictBool = False
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    text: dict[str, Any] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    user: str | None = None
    service_tier: Literal["auto", "default", "flex", "priority"] | None = None
    prompt_cache_key: str | None = None
    prompt_cache_isolation_key: str | None = None
    max_tool_calls: int | None = None


# Fields the worker takes as the client sent them.
_PASSTHROUGH = ("instructions", "max_output_tokens", "metadata", "parallel_tool_calls",
                "reasoning", "temperature", "top_p", "text", "tool_choice", "tools",
                "truncation", "user", "prompt_cache_key")


# Input items as OpenAI's Responses API defines them: what each type must hold (the worker
# checks the rest). Stored items are replayed into every later turn, so no item goes
# further unchecked.
_ROLES = {"user", "assistant", "system", "developer"}
_ITEM_FIELDS: dict[str, dict[str, tuple[type, ...]]] = {
    "message": {"role": (str,), "content": (str, list)},
    "function_call": {"call_id": (str,), "name": (str,), "arguments": (str,)},
    "function_call_output": {"call_id": (str,), "output": (str, list)},
    "reasoning": {"summary": (list,)},
    "item_reference": {"id": (str,)},
}


def check_item(item: dict[str, Any], where: str) -> None:
    """A 400 naming the item's field when it is not an input item."""
    kind = item.get("type", "message")
    fields = _ITEM_FIELDS.get(kind) if isinstance(kind, str) else None
    if fields is None:
        raise FieldError(f"{where}.type", f"unknown input item type {str(kind)[:40]!r}")
    for name, types in fields.items():
        if not isinstance(item.get(name), types):
            raise FieldError(f"{where}.{name}", f"a {kind} item needs {name}")
    if kind == "message":
        if item["role"] not in _ROLES:
            raise FieldError(f"{where}.role", f"unknown role {str(item['role'])[:40]!r}")
        if isinstance(item["content"], list) and not all(
                isinstance(part, dict) and isinstance(part.get("type"), str)
                for part in item["content"]):
            raise FieldError(f"{where}.content", "each content part is an object with a type")


def input_items(value: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A request's `input` as items (a string is one user message)."""
    return [{"role": "user", "content": value}] if isinstance(value, str) else list(value)


def responses_body(request: ResponsesRequest, route: Route, *, account: str,
                   nonce: str) -> dict[str, Any]:
    """Pure: the worker request before the stored conversation is put in front of `input`
    (ResponsesCall.prepare). 400 naming a field the workers cannot honour."""
    deployment = route.deployment
    if deployment.task != "generate":
        raise GatewayError(400, f"Deployment {deployment.name} serves embeddings, not "
                                "responses", param="model")
    if request.max_tool_calls is not None:
        raise GatewayError(400, "max_tool_calls is not supported: the gateway runs no "
                                "built-in tools (function tools are the client's to call)",
                           param="max_tool_calls")
    for tool in request.tools or []:
        if tool.get("type") != "function":
            raise GatewayError(400, f"tools: only function tools are supported, not "
                                    f"{str(tool.get('type'))[:40]!r}", param="tools")
    body: dict[str, Any] = {name: getattr(request, name) for name in _PASSTHROUGH
                            if getattr(request, name) is not None}
    body["input"] = input_items(request.input)
    body.setdefault("max_output_tokens", deployment.max_tokens_chat)  # as chat's default
    body["stream"] = request.stream
    body["store"] = False  # the gateway stores; the worker keeps nothing
    body["request_id"] = response_id(nonce, request.previous_response_id)
    if request.service_tier == "priority" and deployment.priority_scheduling \
            and route.priority_tier:
        body["priority"] = PRIORITY
    return body


def conversation_root(response_id: str | None) -> str | None:
    """The root a gateway response id carries; None for an id that is not the gateway's."""
    if response_id is None or len(response_id) < 21 or not response_id.startswith("resp_"):
        return None
    root = response_id[5:21]
    return root if all(c in "0123456789abcdef" for c in root) else None


def response_id(nonce: str, previous: str | None) -> str:
    return f"resp_{conversation_root(previous) or nonce[:16]}{nonce}"


def usage_of(payload: Any) -> dict[str, Any] | None:
    """A Responses usage block in the usage-record shape."""
    if not isinstance(payload, dict) or not isinstance(payload.get("usage"), dict):
        return None
    usage = payload["usage"]
    details = usage.get("input_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else 0
    return {"prompt_tokens": usage.get("input_tokens"),
            "completion_tokens": usage.get("output_tokens"),
            "total_tokens": usage.get("total_tokens"),
            "prompt_tokens_details": {"cached_tokens": cached}}


def perf_headers(served: Served, response: dict[str, Any],
                 complete: bool) -> list[tuple[bytes, bytes]]:
    """The `fireworks-*` headers, from the engine's own `metrics` in the response where it
    sent them."""
    metrics = perf_metrics(served, coerce_usage(usage_of(response)), response.get("metrics"),
                           complete)
    return fireworks_headers(metrics)


@dataclass(kw_only=True)
class ResponsesCall(Call):
    model: str  # the Fireworks id the client asked for, which answers carry
    adapter: bool  # a LoRA adapter: the body already names it
    account: str
    previous_id: str | None
    store: bool
    responses: ResponseStore = field(repr=False)
    given: str | list[dict[str, Any]]  # the client's `input`, as sent
    history: list[Any] | None = None  # the stored conversation, read once per request

    def prompt_estimate(self) -> int:
        """About four characters per token of the new input's JSON (the stored history is
        counted by the worker, and settled then)."""
        return len(orjson.dumps(self.given)) // 4 + 4

    @property
    def conversation(self) -> list[Any]:
        """This turn's whole input: the history, then the new items."""
        return [*(self.history or []), *self.body["input"]]

    # No cache_query: input items are not what /tokenize renders; the conversation root
    # keys the affinity instead.

    def prefix_material(self, limit: int) -> bytes | None:
        """The instructions, the tools and the first input item."""
        body = self.body
        return orjson.dumps([body.get("instructions"), body.get("tools"),
                             body["input"][0]])[:limit]

    async def prepare(self, worker: Worker, encoded: bytes) -> bytes:
        if self.previous_id is not None and self.history is None:
            previous = await self.responses.load(self.account, self.previous_id)
            if previous is None:
                raise GatewayError(404, f"Response {self.previous_id} not found",
                                   param="previous_response_id")
            self.history = previous.next_input()
        if self.history is not None or not self.adapter:  # else: the body as encoded
            body = self.body | {"input": self.conversation}
            if not self.adapter:
                body["model"] = await worker.served_model()
            encoded = orjson.dumps(body)
        if self.store and len(encoded) > self.responses.max_bytes:
            # (checked before generating: what is stored is this conversation and more)
            raise GatewayError(400, f"This conversation is {len(encoded)} bytes, past the "
                                    f"{self.responses.max_bytes} a stored response may hold: "
                                    "send store: false, or start a new conversation",
                               param="store")
        return encoded

    def client_view(self, response: dict[str, Any]) -> dict[str, Any]:
        """The worker's response object as the client sees it."""
        if response.get("id") != self.body["request_id"]:
            raise WorkerFault(f"a response with another id: {str(response.get('id'))[:80]}")
        response["model"] = self.model
        response["previous_response_id"] = self.previous_id
        response["store"] = self.store
        return response

    async def keep(self, response: dict[str, Any]) -> None:
        """Store the finished response (store: true). A store that cannot be reached loses
        the stored copy, not the answer: the client has it, the log says so."""
        if not self.store:
            return
        try:
            if not await self.responses.save(self.account, response["id"],
                                             StoredResponse(response, self.conversation)):
                response["store"] = False  # larger than a stored response may be
        except Exception as exc:  # Redis unreachable: answer anyway, saying so
            logger.warning("response %s not stored: %r", response["id"], exc)
            response["store"] = False

    async def reply(self, raw: bytes, worker: Worker, served: Served) -> Reply:
        data = worker_json(raw)
        if not isinstance(data, dict) or data.get("object") != "response" \
                or not isinstance(data.get("output"), list):
            raise WorkerFault(f"not a response: {str(data)[:200]}")
        served.first_token()
        served.usage = usage_of(data)
        await self.keep(self.client_view(data))
        return Reply(orjson.dumps(data), perf_headers(served, data, complete=True))

    def framing(self, worker: Worker, served: Served) -> ResponseFraming:
        return ResponseFraming(self, served)


@dataclass
class ResponseFraming(Framing):
    """The Responses events, relayed as they come: ready at `response.created`, done at
    `response.completed` (or `.incomplete`), where the response is stored; an `error` or
    `response.failed` from the worker is a fault; after the first byte a failure becomes
    a `response.failed` event."""

    call: ResponsesCall
    served: Served
    ready: bool = False
    done: bool = False
    sequence: int = -1
    created: dict[str, Any] = field(default_factory=dict)

    async def take(self, events: list[tuple[str, bytes]]) -> list[bytes]:
        parts = []
        for name, data in events:
            if name == "" and data.strip() == b"[DONE]":
                continue
            parts.append(await self.event(name, data))
            if self.done:
                break
        return parts

    async def event(self, name: str, data: bytes) -> bytes:
        event = worker_json(data)
        kind = event.get("type") if isinstance(event, dict) else None
        if not isinstance(kind, str) or (name and name != kind):
            raise WorkerFault(f"not a Responses event: {data[:200]!r}")
        if kind in ("error", "response.failed"):
            raise WorkerFault(f"the worker sent {kind}: {data[:300]!r}")
        if isinstance(event.get("sequence_number"), int):
            self.sequence = event["sequence_number"]
        if kind in _RESPONSE_EVENTS:
            response = event.get("response")
            if not isinstance(response, dict):
                raise WorkerFault(f"{kind} without a response: {data[:200]!r}")
            self.call.client_view(response)
            self.created = response
            if kind in _LAST_EVENTS:
                self.served.usage = usage_of(response)
                await self.call.keep(response)
            data = orjson.dumps(event)
        if kind.endswith(".delta"):
            self.served.first_token()
        self.ready = self.ready or kind == "response.created"
        self.done = kind in _LAST_EVENTS
        return sse(data, kind)

    def headers(self) -> list[tuple[bytes, bytes]]:
        return perf_headers(self.served, self.created, complete=False)

    def error_event(self, exc: GatewayError, request_id: str) -> bytes:
        response = dict(self.created) or {"id": self.call.body["request_id"],
                                          "object": "response", "model": self.call.model}
        response |= {"status": "failed", "error": {
            "code": "server_error" if exc.status >= 500 else "invalid_request",
            "message": f"{exc.message} (request {request_id})"}}
        event = {"type": "response.failed", "sequence_number": self.sequence + 1,
                 "response": response}
        return sse(orjson.dumps(event), "response.failed")


class ResponsesApi(Api):
    path = "/responses"
    worker_path = "/v1/responses"
    request_model: type[BaseModel] = ResponsesRequest

    def __init__(self, responses: ResponseStore) -> None:
        self.responses = responses

    def translate(self, request: ResponsesRequest, route: Route, settings: Settings, *,
                  account: str, nonce: str) -> ResponsesCall:
        body = responses_body(request, route, account=account, nonce=nonce)
        # A later turn's conversation root keys the affinity when the client names no key
        # (its turns share a cached prefix).
        root = conversation_root(request.previous_response_id)
        return ResponsesCall(
            body=body, model=route.requested_model, adapter=route.lora is not None,
            account=account, previous_id=request.previous_response_id, store=request.store,
            responses=self.responses, stream=request.stream,
            max_tokens=body["max_output_tokens"], metadata=request.metadata,
            priority=request.service_tier == "priority" and route.priority_tier,
            given=request.input,
            cache_scope=cache_scope(request),
            affinity=request.prompt_cache_key or request.user
            or (None if root is None else f"conversation:{root}"))
