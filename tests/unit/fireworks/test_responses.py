"""The Responses API: the pure translation by table, the stores (in process and in a real
redis-server), and the whole path through the gateway over a scripted worker that answers
as vLLM's /v1/responses does: conversations rebuilt from the store, ids, accounts, streams
and their faults."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from gateway.config import Settings
from gateway.controlplane.registry import Deployment, Lora, Route
from gateway.controlplane.responses import LocalResponses, RedisResponses, StoredResponse
from gateway.dataplane.isolation import isolate
from gateway.errors import GatewayError
from gateway.fireworks.responses import (
    ResponsesApi,
    ResponsesRequest,
    conversation_root,
    response_id,
    responses_body,
)
from gateway.validation import known_fields, parse_body
from tests.redis_server import RedisServer
from tests.unit.fake_worker import KEY, MODEL, RESET, Stream
from tests.unit.harness import Harness, build, registry

OTHER_KEY = "k-other"
NONCE = "0123456789abcdef0123456789abcdef"


def route(entitled: bool = True, **deployment: Any) -> Route:
    return Route(Deployment(id="d", account="fireworks", model=MODEL, **deployment), MODEL,
                 priority_tier=entitled)


def body(**request: Any) -> dict[str, Any]:
    """The worker request as the data plane sends it: translated, then salted."""
    parsed = ResponsesRequest.model_validate({"model": MODEL, "input": "hi"} | request)
    call = ResponsesApi(LocalResponses(60)).translate(parsed, route(), Settings(),
                                                      account="a", nonce=NONCE)
    isolate(call, "a", NONCE)
    return call.body


@pytest.mark.parametrize(("request_fields", "expected"), [
    ({}, {"input": [{"role": "user", "content": "hi"}], "store": False, "stream": False,
          "max_output_tokens": 2048}),
    ({"input": [{"role": "user", "content": "x"}], "max_output_tokens": 5},
     {"input": [{"role": "user", "content": "x"}], "max_output_tokens": 5}),
    ({"instructions": "be brief", "temperature": 0.5, "top_p": 0.9, "user": "u",
      "metadata": {"k": "v"}, "truncation": "auto", "parallel_tool_calls": False},
     {"instructions": "be brief", "temperature": 0.5, "top_p": 0.9, "user": "u",
      "metadata": {"k": "v"}, "truncation": "auto", "parallel_tool_calls": False}),
    ({"text": {"format": {"type": "json_object"}}, "reasoning": {"effort": "low"}},
     {"text": {"format": {"type": "json_object"}}, "reasoning": {"effort": "low"}}),
    ({"tools": [{"type": "function", "name": "f", "parameters": {}}], "tool_choice": "auto"},
     {"tools": [{"type": "function", "name": "f", "parameters": {}}], "tool_choice": "auto"}),
    ({"store": True, "stream": True}, {"store": False, "stream": True}),  # the gateway stores
    ({"previous_response_id": "resp_x"}, {"input": [{"role": "user", "content": "hi"}]}),
])
def test_the_worker_request(request_fields: dict[str, Any], expected: dict[str, Any]) -> None:
    translated = body(**request_fields)
    assert translated | expected == translated
    assert "previous_response_id" not in translated and "max_tool_calls" not in translated
    assert translated["request_id"] == f"resp_{NONCE[:16]}{NONCE}"
    assert len(translated["cache_salt"]) == 32


# Every field: a sample value and where it goes ("body": to the worker as sent; "refused": a
# 400 naming it; otherwise what takes it). Checked against the request model.
FIELDS: dict[str, tuple[Any, str]] = {
    "model": (MODEL, "routing (resolve)"),
    "input": ("hi", "the worker's input, after the stored conversation"),
    "previous_response_id": ("resp_x", "ResponsesCall.prepare reads the store"),
    "store": (False, "ResponsesCall.keep"),
    "stream": (True, "body"),
    "instructions": ("be brief", "body"),
    "max_output_tokens": (7, "body"),
    "metadata": ({"k": "v"}, "body"),
    "parallel_tool_calls": (False, "body"),
    "reasoning": ({"effort": "low"}, "body"),
    "temperature": (0.3, "body"),
    "top_p": (0.5, "body"),
    "text": ({"format": {"type": "json_object"}}, "body"),
    "tool_choice": ("required", "body"),
    "tools": ([{"type": "function", "name": "f", "parameters": {}}], "body"),
    "truncation": ("auto", "body"),
    "user": ("u", "body"),
    "prompt_cache_key": ("k", "body"),
    "prompt_cache_isolation_key": ("iso", "cache_salt"),
    "service_tier": ("priority", "Call.priority (the gateway's queue)"),
    "max_tool_calls": (2, "refused"),
}


def test_every_field_has_a_row() -> None:
    assert set(FIELDS) == known_fields(ResponsesRequest)


@pytest.mark.parametrize("name", sorted(FIELDS))
def test_each_field_takes_effect(name: str) -> None:
    value, where = FIELDS[name]
    if where == "refused":
        with pytest.raises(GatewayError) as caught:
            body(**{name: value})
        assert caught.value.param == name
    elif where == "body":
        assert body(**{name: value})[name] == value
    elif where == "cache_salt":
        assert body(**{name: value})["cache_salt"] != body()["cache_salt"]
    else:
        body(**{name: value})  # accepted; its effect is tested below


@pytest.mark.parametrize(("request_fields", "param"), [
    ({"max_tool_calls": 3}, "max_tool_calls"),
    ({"tools": [{"type": "web_search_preview"}]}, "tools"),
    ({"background": True}, "background"),
    ({"input": ""}, "input"),
    ({"input": []}, "input"),
    ({"store": "yes"}, "store"),
    ({"metadata": {str(i): "v" for i in range(17)}}, "metadata"),
    ({"truncation": "sometimes"}, "truncation"),
])
def test_refused_fields_are_named(request_fields: dict[str, Any], param: str) -> None:
    with pytest.raises((GatewayError, ValueError)) as caught:
        body(**request_fields)
    if isinstance(caught.value, GatewayError):
        assert caught.value.status == 400 and caught.value.param == param
    else:
        assert param in str(caught.value)


def test_an_embedding_deployment_is_refused() -> None:
    request = ResponsesRequest.model_validate({"model": MODEL, "input": "hi"})
    with pytest.raises(GatewayError) as caught:
        responses_body(request, route(task="embed"), account="a", nonce=NONCE)
    assert caught.value.param == "model"


def test_ids_carry_the_conversation_root() -> None:
    first = response_id(NONCE, None)
    second = response_id("f" * 32, first)
    assert conversation_root(first) == conversation_root(second) == NONCE[:16]
    assert first != second and second.endswith("f" * 32)
    assert conversation_root("resp_not-ours") is None
    assert conversation_root(None) is None


def test_priority_reaches_workers_that_schedule_by_it() -> None:
    request = ResponsesRequest.model_validate({"model": MODEL, "input": "hi",
                                               "service_tier": "priority"})
    plain = responses_body(request, route(), account="a", nonce=NONCE)
    scheduled = responses_body(request, route(priority_scheduling=True), account="a",
                               nonce=NONCE)
    assert "priority" not in plain and scheduled["priority"] == -1
    # Only for an account the registry entitles to the priority tier.
    refused = responses_body(request, route(False, priority_scheduling=True), account="a",
                             nonce=NONCE)
    assert "priority" not in refused


# The stores: the same behaviour in process and in Redis.

@pytest.fixture(params=["local", "redis"])
def store(request: pytest.FixtureRequest) -> Iterator[Any]:
    if request.param == "local":
        yield LocalResponses(ttl=60)
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    import redis.asyncio as aioredis
    yield RedisResponses(aioredis.from_url(server.url), f"t{uuid.uuid4().hex[:6]}:", ttl=60)


async def test_a_store_keeps_per_account(store: Any) -> None:
    kept = StoredResponse({"id": "r1", "output": [{"type": "message"}]}, [{"role": "user"}])
    await store.save("alpha", "r1", kept)
    assert (await store.load("alpha", "r1")) == kept
    assert await store.load("beta", "r1") is None  # another account's id finds nothing
    assert not await store.delete("beta", "r1")
    assert kept.next_input() == [{"role": "user"}, {"type": "message"}]
    assert await store.delete("alpha", "r1")
    assert await store.load("alpha", "r1") is None and not await store.delete("alpha", "r1")


@pytest.fixture(params=["local", "redis"])
def small_store(request: pytest.FixtureRequest) -> Iterator[Any]:
    """A store that keeps responses of at most 200 bytes, 3 and 250 bytes per account."""
    if request.param == "local":
        yield LocalResponses(ttl=60, max_bytes=200, per_account=3, account_bytes=250)
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    import redis.asyncio as aioredis
    yield RedisResponses(aioredis.from_url(server.url), f"t{uuid.uuid4().hex[:6]}:", ttl=60,
                         max_bytes=200, per_account=3, account_bytes=250)


async def test_what_one_account_stores_is_bounded(small_store: Any) -> None:
    large = StoredResponse({"id": "big", "output": []}, [{"content": "x" * 200}])
    assert not await small_store.save("flood", "big", large)  # past the size: not stored
    assert await small_store.load("flood", "big") is None
    await small_store.save("quiet", "q1", StoredResponse({"id": "q1"}, []))
    for n in range(10):  # a flooding account keeps its newest 3, and crowds out no one
        assert await small_store.save("flood", f"r{n}", StoredResponse({"id": f"r{n}"}, []))
    kept = [n for n in range(10) if await small_store.load("flood", f"r{n}") is not None]
    assert kept == [7, 8, 9]
    assert await small_store.load("quiet", "q1") is not None
    if isinstance(small_store, RedisResponses):  # the evicted ones' keys are gone too
        keys = await small_store.client.keys(f"{small_store.prefix}response:flood:*")
        assert len(keys) == 3
        assert await small_store.client.zcard(f"{small_store.prefix}responses:flood") == 3
    assert await small_store.delete("flood", "r9")
    assert await small_store.load("flood", "r9") is None
    # 250 bytes per account: two responses of ~110 bytes, not three.
    for n in range(3):
        await small_store.save("bulky", f"b{n}", StoredResponse({"id": f"b{n}"},
                                                                 ["x" * 70]))
    assert [await small_store.load("bulky", f"b{n}") is not None for n in range(3)] == \
        [False, True, True]
    assert await small_store.load("quiet", "q1") is not None


async def test_a_full_process_store_takes_from_the_account_holding_the_most() -> None:
    store = LocalResponses(ttl=60, max_entries=4)
    await store.save("quiet", "q", StoredResponse({"id": "q"}, []))
    for n in range(6):
        await store.save("flood", f"r{n}", StoredResponse({"id": f"r{n}"}, []))
    assert await store.load("quiet", "q") is not None  # the oldest, but not the largest
    assert len(store.entries) == 4 and len(store.of_account["flood"]) == 3


async def test_local_store_is_bounded_and_expires() -> None:
    store = LocalResponses(ttl=60, max_entries=2)
    for name in ("a", "b", "c"):
        await store.save("x", name, StoredResponse({"id": name}, []))
    assert await store.load("x", "a") is None and await store.load("x", "c") is not None
    expired = LocalResponses(ttl=-1)
    await expired.save("x", "a", StoredResponse({"id": "a"}, []))
    assert await expired.load("x", "a") is None and not expired.entries


# Through the gateway, over a scripted worker.

def answer(request: dict[str, Any], text: str) -> dict[str, Any]:
    tokens = sum(len(str(item)) for item in request["input"]) // 10
    return {"id": request["request_id"], "object": "response", "model": "served",
            "status": "completed",
            "output": [{"id": "msg_1", "type": "message", "role": "assistant",
                        "status": "completed",
                        "content": [{"type": "output_text", "text": text,
                                     "annotations": []}]}],
            "usage": {"input_tokens": tokens, "output_tokens": 2, "total_tokens": tokens + 2,
                      "input_tokens_details": {"cached_tokens": 0}}}


def sse(event: dict[str, Any]) -> bytes:
    return b"event: " + event["type"].encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n"


def handler(http: httpx.Request) -> httpx.Response:
    if http.url.path == "/v1/models":
        return httpx.Response(200, json={"data": [{"id": "served"}]})
    request = orjson.loads(http.content)
    last = request["input"][-1].get("content")
    if last == "bad answer":
        return httpx.Response(200, json={"object": "response"})
    if not request["stream"]:
        return httpx.Response(200, json=answer(request, f"re: {last}"))
    done = answer(request, "Hello!")
    created = done | {"status": "in_progress", "output": [], "usage": None}
    parts: list[Any] = [sse({"type": "response.created", "sequence_number": 0,
                             "response": created}),
                        sse({"type": "response.output_text.delta", "sequence_number": 1,
                             "delta": "Hello", "item_id": "msg_1", "output_index": 0,
                             "content_index": 0})]
    if last == "cut":
        parts.append(RESET)
    else:
        parts.append(sse({"type": "response.completed", "sequence_number": 2,
                          "response": done}))
    return httpx.Response(200, headers={"content-type": "text/event-stream"},
                          stream=Stream(parts))


@pytest.fixture
def app(tmp_path: Path) -> Harness:
    return build(tmp_path, handler, registry_of=lambda urls: registry(
        urls.values(), accounts={"fireworks": KEY, "other": OTHER_KEY}))


async def call(app: Harness, method: str, path: str, body: dict[str, Any] | None = None,
               key: str = KEY) -> httpx.Response:
    transport = httpx.ASGITransport(app=app.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
        return await client.request(method, f"/inference/v1{path}", json=body,
                                    headers={"authorization": f"Bearer {key}"})


async def test_a_conversation_across_turns(app: Any) -> None:
    async with app.running():
        first = await call(app, "POST", "/responses", {"model": MODEL, "input": "one"})
        assert first.status_code == 200, first.text
        one = first.json()
        assert one["model"] == MODEL and one["id"].startswith("resp_") and one["store"]
        assert first.headers["fireworks-prompt-tokens"] == str(one["usage"]["input_tokens"])
        assert first.headers["fireworks-deployment"] == "accounts/fireworks/deployments/d"
        second = (await call(app, "POST", "/responses", {
            "model": MODEL, "input": "two", "previous_response_id": one["id"]})).json()
        assert second["previous_response_id"] == one["id"]
        assert conversation_root(second["id"]) == conversation_root(one["id"])
        sent = [orjson.loads(r.content) for r in app.workers.served.requests
                if r.url.path == "/v1/responses"]
        assert sent[1]["input"] == [{"role": "user", "content": "one"}, *one["output"],
                                    {"role": "user", "content": "two"}]
        assert all("previous_response_id" not in s and s["store"] is False for s in sent)
        assert sent[1]["model"] == "served"
        assert second["usage"]["input_tokens"] > one["usage"]["input_tokens"]
        assert (await call(app, "GET", f"/responses/{one['id']}")).json() == one
        assert (await call(app, "GET", f"/responses/{one['id']}", key=OTHER_KEY)
                ).status_code == 404
        assert (await call(app, "POST", "/responses", {
            "model": MODEL, "input": "x", "previous_response_id": one["id"]},
            key=OTHER_KEY)).status_code == 404  # another account cannot continue it
        assert (await call(app, "DELETE", f"/responses/{one['id']}", key=OTHER_KEY)
                ).status_code == 404
        assert (await call(app, "DELETE", f"/responses/{one['id']}")).status_code == 200
        gone = await call(app, "GET", f"/responses/{one['id']}")
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "NOT_FOUND"
        records = app.gateway.ledger.kept
        assert [(r.endpoint, r.status) for r in records][:2] == \
            [("/v1/responses", "ok")] * 2
        assert records[1].prompt_tokens == second["usage"]["input_tokens"]


async def test_not_stored_unknown_previous_and_bad_answers(app: Any) -> None:
    async with app.running():
        unstored = (await call(app, "POST", "/responses",
                               {"model": MODEL, "input": "x", "store": False})).json()
        assert (await call(app, "GET", f"/responses/{unstored['id']}")).status_code == 404
        unknown = await call(app, "POST", "/responses", {
            "model": MODEL, "input": "x", "previous_response_id": "resp_nope"})
        assert unknown.status_code == 404
        assert unknown.json()["error"]["param"] == "previous_response_id"
        bad = await call(app, "POST", "/responses", {"model": MODEL, "input": "bad answer"})
        assert bad.status_code == 502


async def test_a_stream_is_relayed_stored_and_fails_as_an_event(app: Any) -> None:
    async with app.running():
        streamed = await call(app, "POST", "/responses",
                              {"model": MODEL, "input": "hi", "stream": True})
        assert streamed.status_code == 200 and "fireworks-backend-host" in streamed.headers
        events = [orjson.loads(line[6:]) for line in streamed.text.splitlines()
                  if line.startswith("data: ")]
        assert [e["type"] for e in events] == ["response.created",
                                               "response.output_text.delta",
                                               "response.completed"]
        done = events[-1]["response"]
        assert done["model"] == MODEL and events[0]["response"]["model"] == MODEL
        stored = await call(app, "GET", f"/responses/{done['id']}")
        assert stored.json()["output"] == done["output"]
        cut = await call(app, "POST", "/responses",
                         {"model": MODEL, "input": "cut", "stream": True})
        last = [orjson.loads(line[6:]) for line in cut.text.splitlines()
                if line.startswith("data: ")][-1]
        assert last["type"] == "response.failed" and last["sequence_number"] == 2
        assert last["response"]["status"] == "failed"
        assert (await call(app, "GET", f"/responses/{last['response']['id']}")
                ).status_code == 404
        statuses = [(r.status, r.http_status) for r in app.gateway.ledger.kept]
        assert statuses == [("ok", 200), ("error", 502)]


async def test_a_conversation_too_large_to_store_is_refused_before_generating(
        tmp_path: Path) -> None:
    gateway = build(tmp_path, handler, responses_max_bytes=2000)
    async with gateway.running():
        body = {"model": MODEL, "input": "x" * 3000}
        refused = await call(gateway, "POST", "/responses", body)
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["param"] == "store"
        assert gateway.workers is not None
        assert not [r for r in gateway.workers.served.requests
                    if r.url.path == "/v1/responses"]
        served = await call(gateway, "POST", "/responses", body | {"store": False})
        assert served.status_code == 200, served.text
        # Within the bound on the way in, past it with the output: answered, not stored.
        near = await call(gateway, "POST", "/responses", {"model": MODEL, "input": "y" * 1500})
        assert near.status_code == 200 and near.json()["store"] is False
        assert (await call(gateway, "GET", f"/responses/{near.json()['id']}")
                ).status_code == 404


@pytest.mark.parametrize(("item", "param"), [
    ({"type": "shell_call", "command": "rm"}, "input[1].type"),
    ({"role": "root", "content": "x"}, "input[1].role"),
    ({"role": "user"}, "input[1].content"),
    ({"role": "user", "content": ["text"]}, "input[1].content"),
    ({"type": "function_call", "call_id": "c", "name": "f"}, "input[1].arguments"),
    ({"type": "function_call_output", "output": "o"}, "input[1].call_id"),
    ({"type": 7}, "input[1].type"),
])
def test_input_items_are_checked(item: dict[str, Any], param: str) -> None:
    with pytest.raises(GatewayError) as refused:
        parse_body(orjson.dumps({"model": MODEL, "input": [
            {"role": "user", "content": "hi"}, item]}), ResponsesRequest, Settings())
    assert refused.value.status == 400 and refused.value.param == param


def test_known_input_items_pass() -> None:
    items = [{"role": "user", "content": [{"type": "input_text", "text": "hi"}]},
             {"type": "message", "role": "assistant", "content": "a"},
             {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
             {"type": "function_call_output", "call_id": "c", "output": "o"},
             {"type": "reasoning", "summary": []}, {"type": "item_reference", "id": "i"}]
    request = parse_body(orjson.dumps({"model": MODEL, "input": items}), ResponsesRequest,
                         Settings())
    assert request.input == items


async def test_an_adapters_first_turn_goes_as_encoded_within_the_stored_size() -> None:
    """A LoRA adapter's request names the adapter already and has no history: the body the
    data plane encoded goes as it is (no second encoding, no served-model lookup), and a
    conversation too large to store is refused all the same."""
    adapter = Route(Deployment(id="d", account="fireworks", model=MODEL), MODEL,
                    lora=Lora(id="l", account="fireworks", deployment="d", source="s"))
    api = ResponsesApi(LocalResponses(60, max_bytes=2000))

    class NoLookups:
        async def served_model(self) -> str:
            raise AssertionError("an adapter's request names its model already")

    for text, store, refused in (("hi", True, False), ("x" * 3000, False, False),
                                 ("x" * 3000, True, True)):
        parsed = ResponsesRequest.model_validate({"model": MODEL, "input": text,
                                                  "store": store})
        call = api.translate(parsed, adapter, Settings(), account="a", nonce=NONCE)
        encoded = orjson.dumps(call.body)
        if refused:
            with pytest.raises(GatewayError) as error:
                await call.prepare(NoLookups(), encoded)  # type: ignore[arg-type]
            assert error.value.param == "store"
        else:
            assert await call.prepare(NoLookups(), encoded) is encoded  # type: ignore[arg-type]
