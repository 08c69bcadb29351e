"""Worker faults seen through the gateway, with scripted workers on real sockets.

Every case runs with two replicas: `bad` plays the fault and is listed first (so it is
chosen first), `good` answers well. For each fault: the client's status and body shape,
that nothing of the worker's internals leaks, failover to `good` when the fault came before
the first byte, exactly one usage record with the right status, and the concurrency slot and
the in-flight gauge released.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.unit.fake_worker import (
    KEY,
    MODEL,
    RESET,
    Pause,
    Stream,
    chunk,
)
from tests.unit.harness import Harness, build, registry

ADMIN = "admin-secret"

USAGE = {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}
# What a careless worker puts in its error bodies: none of it may reach a client.
SECRET = "Traceback (most recent call last): token=sk-live-secret host=10.9.8.7:8001"
LEAKS = ("Traceback", "sk-live-secret", "10.9.8.7", "127.0.0.1", "Error(", "Exception")
COMPLETION = {"id": "c", "object": "text_completion", "created": 1, "usage": USAGE,
              "choices": [{"index": 0, "text": "good", "finish_reason": "stop"}]}
GOOD_STREAM = [chunk("good"), chunk("", "stop"), chunk(usage=USAGE), b"data: [DONE]\n\n"]
ERROR_EVENT = b"data: " + orjson.dumps({"error": {"message": SECRET, "code": 500}}) + b"\n\n"


def good(request: httpx.Request) -> httpx.Response:
    if orjson.loads(request.content).get("stream"):
        return httpx.Response(200, stream=Stream(list(GOOD_STREAM)))
    return httpx.Response(200, json=COMPLETION)


def limited(urls: dict[str, str]) -> dict[str, Any]:
    content = registry([urls["bad"], urls["good"]])
    content["accounts"][0]["limits"] = {"concurrent_requests": 2}
    return content


def app(tmp_path: Path, bad: Any) -> Harness:
    """The gateway over `bad` then `good` (`bad` first: each fault is met before the
    failover); the account may hold 2 requests at once."""
    return build(tmp_path, lambda r: bad(r) if r.url.host == "bad" else good(r),
                 hosts=("bad", "good"), registry_of=limited, listed_order=True,
                 upstream_read_timeout=1.0, eject_after_failures=100, admin_key=ADMIN)


async def call(gateway_app: Harness, body: dict[str, Any]) -> httpx.Response:
    async with gateway_app.running() as client:
        response = await client.post("/v1/completions", json={"model": MODEL} | body,
                                     headers={"Authorization": f"Bearer {KEY}",
                                              "x-request-id": "req-1"})
        metrics = (await client.get("/metrics", headers={"Authorization": f"Bearer {ADMIN}"})
                   ).text
    assert not re.search(r"fwgw_requests_in_flight\{[^}]*\} (?!0\.0)", metrics), metrics
    limiter = gateway_app.gateway.limiter
    assert not limiter.concurrent.get("fireworks"), "the concurrency slot leaked"
    return response


def events(response: httpx.Response) -> list[str]:
    return [block for block in response.text.split("\n\n") if block]


def record(gateway_app: Any) -> Any:
    (only,) = gateway_app.gateway.ledger.kept
    return only


def stream(*parts: bytes | Pause | Exception, content_type: str = "text/event-stream"
           ) -> Any:
    return lambda r: httpx.Response(200, headers={"content-type": content_type},
                                    stream=Stream(list(parts)))


def answer(status: int, **kwargs: Any) -> Any:
    return lambda r: httpx.Response(status, **kwargs)


def drop(request: httpx.Request) -> httpx.Response:
    raise ConnectionResetError


@dataclass
class Fault:
    name: str
    bad: Any
    stream: bool


# Faults before the first byte reached the client: retried on `good`, which answers.
BEFORE_FIRST_BYTE = [
    Fault("error event first", stream(ERROR_EVENT, b"data: [DONE]\n\n"), True),
    Fault("eof without [DONE], no events", stream(), True),
    Fault("sse without data lines", stream(b": ping\n\n", b"event: x\n\n"), True),
    Fault("reset before the first token", stream(RESET), True),
    Fault("reset before any answer", drop, True),
    Fault("hang before the first token", stream(Pause(5)), True),
    Fault("html on a stream", answer(200, html="<html>" + SECRET), True),
    Fault("json on a stream", answer(200, json=COMPLETION), True),
    Fault("invalid first event", stream(b"data: {nope\n\n"), True),
    Fault("302 on a stream", answer(302, headers={"location": "http://10.9.8.7/"}), True),
    Fault("401", answer(401, json={"error": {"message": SECRET}}), False),
    Fault("403", answer(403, text=SECRET), False),
    Fault("404", answer(404, json={"detail": SECRET}), False),
    Fault("500 with a traceback", answer(500, text=SECRET), False),
    Fault("503", answer(503, text=SECRET), True),
    Fault("3xx", answer(307, headers={"location": "/elsewhere"}), False),
    Fault("empty body", answer(200, content=b"", headers={"content-type":
                                                          "application/json"}), False),
    Fault("invalid json", answer(200, content=b"{nope", headers={"content-type":
                                                                "application/json"}), False),
    Fault("a list", answer(200, json=[COMPLETION]), False),
    Fault("html", answer(200, html="<html>" + SECRET), False),
    Fault("no choices", answer(200, json={"id": "c", "usage": USAGE}), False),
    Fault("no id", answer(200, json={k: v for k, v in COMPLETION.items() if k != "id"}),
          False),
    Fault("choices of the wrong type", answer(200, json=COMPLETION | {"choices": "x"}), False),
    Fault("text of the wrong type", answer(200, json=COMPLETION | {
        "choices": [{"index": 0, "text": 5, "finish_reason": "stop"}]}), False),
    Fault("an error object on 200", answer(200, json={"error": {"message": SECRET}}), False),
    Fault("hang", lambda r: httpx.Response(200, stream=Stream([Pause(5)]),
                                           headers={"content-type": "application/json"}),
          False),
]


@pytest.mark.parametrize("fault", BEFORE_FIRST_BYTE, ids=lambda f: f.name)
async def test_faults_before_the_first_byte_fail_over(tmp_path: Path, fault: Fault) -> None:
    gateway_app = app(tmp_path, fault.bad)
    response = await call(gateway_app, {"prompt": "x", "stream": fault.stream})
    assert response.status_code == 200, response.text
    assert response.headers["x-request-id"] == "req-1"
    if fault.stream:
        assert events(response)[-1] == "data: [DONE]"
        assert "good" in response.text and "event: error" not in response.text
    else:
        assert response.json()["choices"][0]["text"] == "good"
    hosts = [r.url.host for r in gateway_app.workers.served.requests]
    assert hosts == ["bad", "good"]
    done = record(gateway_app)
    assert (done.status, done.http_status, done.replica) == (
        "ok", 200, gateway_app.workers.urls["good"])
    health = gateway_app.gateway.replicas.health.states
    assert health[gateway_app.workers.urls["bad"]].failures == 1


@pytest.mark.parametrize("fault", BEFORE_FIRST_BYTE, ids=lambda f: f.name)
async def test_faults_with_no_replica_left_are_clean_5xx(tmp_path: Path, fault: Fault) -> None:
    """The same faults on every replica: a 5xx envelope that names the request, no leak."""
    gateway_app = app(tmp_path, fault.bad)
    gateway_app.workers.handler = fault.bad  # both replicas misbehave
    response = await call(gateway_app, {"prompt": "x", "stream": fault.stream})
    assert response.status_code in (502, 503, 504), response.text
    error = response.json()["error"]
    assert error["type"] == "internal_server_error" and response.json()["request_id"] == "req-1"
    assert not any(leak in response.text for leak in LEAKS), response.text
    done = record(gateway_app)
    assert (done.status, done.http_status) == ("error", response.status_code)


# Faults after the first token (the pause lets it reach the client first): the chunks so
# far, the error event, [DONE]; no retry.
FIRST = (chunk("a"), Pause(0.1))
AFTER_FIRST_BYTE = [
    Fault("error event mid-stream", stream(*FIRST, ERROR_EVENT), True),
    Fault("eof without [DONE]", stream(*FIRST, chunk("b")), True),
    Fault("reset mid-stream", stream(*FIRST, RESET), True),
    Fault("malformed event", stream(*FIRST, b"data: [1, 2]\n\n"), True),
    Fault("invalid json event", stream(*FIRST, b"data: {nope\n\n"), True),
    Fault("hang mid-stream", stream(*FIRST, Pause(5)), True),
    Fault("finish chunk then eof", stream(*FIRST, chunk("b", "stop")), True),
]


@pytest.mark.parametrize("fault", AFTER_FIRST_BYTE, ids=lambda f: f.name)
async def test_faults_after_the_first_byte_end_with_an_error_event(tmp_path: Path,
                                                                  fault: Fault) -> None:
    gateway_app = app(tmp_path, fault.bad)
    response = await call(gateway_app, {"prompt": "x", "stream": True})
    assert response.status_code == 200
    blocks = events(response)
    assert blocks[0].startswith("data: ") and orjson.loads(blocks[0][6:])["choices"][0][
        "text"] == "a"
    assert blocks[-1] == "data: [DONE]"
    assert blocks[-2].startswith("event: error\ndata: ")
    error = orjson.loads(blocks[-2].split("data: ", 1)[1])["error"]
    assert error["status_code"] in (502, 504) and "req-1" in error["message"]
    assert not any(leak in response.text for leak in LEAKS), response.text
    if fault.name == "finish chunk then eof":  # the held finish chunk is not lost
        finish = orjson.loads(blocks[-3][6:])["choices"][0]
        assert (finish["text"], finish["finish_reason"]) == ("b", "stop")
    assert [r.url.host for r in gateway_app.workers.served.requests] == ["bad"]
    done = record(gateway_app)
    assert (done.status, done.http_status) == ("error", error["status_code"])


async def test_a_slow_drip_is_relayed_whole(tmp_path: Path) -> None:
    gateway_app = app(tmp_path, stream(chunk("a"), Pause(0.3), chunk("b"), Pause(0.3),
                                       chunk("", "stop"), chunk(usage=USAGE),
                                       b"data: [DONE]\n\n"))
    response = await call(gateway_app, {"prompt": "x", "stream": True})
    texts = [orjson.loads(b[6:])["choices"][0]["text"] for b in events(response)[:-1]]
    assert texts == ["a", "b", ""] and events(response)[-1] == "data: [DONE]"
    assert record(gateway_app).status == "ok"


async def test_no_usage_chunk_after_the_finish_chunk(tmp_path: Path) -> None:
    """The finish chunk is released at [DONE] with the last usage the worker reported."""
    def with_usage(text: str, finish: str | None = None) -> bytes:
        body = orjson.loads(chunk(text, finish)[6:]) | {"usage": USAGE}
        return b"data: " + orjson.dumps(body) + b"\n\n"

    gateway_app = app(tmp_path, stream(with_usage("a"), with_usage("b", "length"),
                                       b"data: [DONE]\n\n"))
    response = await call(gateway_app, {"prompt": "x", "stream": True})
    last = orjson.loads(events(response)[-2][6:])
    assert last["choices"][0]["text"] == "b" and last["choices"][0]["finish_reason"] == "length"
    assert last["usage"]["total_tokens"] == 3
    assert record(gateway_app).completion_tokens == 1


async def test_string_token_counts_are_coerced(tmp_path: Path) -> None:
    bad_usage = {"prompt_tokens": "2", "completion_tokens": "many", "total_tokens": None}
    gateway_app = app(tmp_path, answer(200, json=COMPLETION | {"usage": bad_usage}))
    for _ in range(3):  # more than the account's 2 concurrent slots: none may leak
        gateway_app.gateway.ledger.kept.clear()
        response = await call(gateway_app, {"prompt": "x"})
        assert response.status_code == 200
        assert response.json()["usage"]["completion_tokens"] == 0
        assert record(gateway_app).status == "ok"


async def test_worker_400_passes_through_with_its_message_only(tmp_path: Path) -> None:
    message = "This model's maximum context length is 2048 tokens."
    gateway_app = app(tmp_path, answer(400, json={"error": {
        "message": message + "\n" + SECRET, "type": "BadRequestError"}}))
    response = await call(gateway_app, {"prompt": "x"})
    assert response.status_code == 400 and response.json()["error"]["message"] == message
    assert response.headers["x-should-retry"] == "false"
    # not retried elsewhere (only the served model's name was asked, to name the model)
    assert [(r.url.host, r.method) for r in gateway_app.workers.served.requests
            if r.url.path != "/v1/models"] == [("bad", "POST")]
    assert (record(gateway_app).status, record(gateway_app).http_status) == ("error", 400)


async def test_a_body_nested_too_deeply_to_encode_is_a_400(tmp_path: Path) -> None:
    schema: Any = {}
    for _ in range(300):
        schema = {"a": schema}
    gateway_app = app(tmp_path, good)
    response = await call(gateway_app, {"prompt": "x", "response_format": {
        "type": "json_object", "schema": schema}})
    assert response.status_code == 400 and "nests too deeply" in response.text
    assert gateway_app.workers.served.requests == []


@pytest.mark.parametrize("request_id,kept", [("abc-123", True), ("é", False),
                                             ("a b", False), ("x" * 129, False)])
async def test_only_short_visible_ascii_request_ids_are_kept(tmp_path: Path, request_id: str,
                                                             kept: bool) -> None:
    gateway_app = app(tmp_path, good)
    async with gateway_app.running() as client:
        response = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x"},
                                     headers={"Authorization": f"Bearer {KEY}",
                                              "x-request-id": request_id.encode()})
    assert response.status_code == 200
    assert (response.headers["x-request-id"] == request_id) is kept


@pytest.mark.parametrize("path,body", [
    ("/v1/messages", lambda nested: {"max_tokens": 5, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "x", "extra": nested}]}]}),
    ("/v1/responses", lambda nested: {"input": [{"role": "user", "content": "x",
                                                "extra": nested}]}),
])
async def test_every_api_refuses_a_body_nested_too_deeply_as_a_400(
        tmp_path: Path, path: str, body: Any) -> None:
    """The account has limits: what its prompt estimate reads is encoded only after the
    body was (a body the encoder refuses is the client's 400, never a 500)."""
    nested: Any = {}
    for _ in range(300):
        nested = {"a": nested}
    gateway_app = app(tmp_path, good)
    response = await gateway_app.once("POST", path, json={"model": MODEL} | body(nested))
    assert response.status_code == 400 and "nests too deeply" in response.text
    assert gateway_app.workers.served.requests == []
