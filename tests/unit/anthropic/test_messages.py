"""The Messages API relay with scripted workers: usage records, worker faults before and after
the first byte, Anthropic's error shape."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import orjson

from tests.unit.fake_worker import KEY, MODEL, Stream
from tests.unit.harness import Harness, build

MESSAGE = {"id": "msg_1", "type": "message", "role": "assistant", "model": "served",
           "content": [{"type": "text", "text": "Paris"}], "stop_reason": "end_turn",
           "usage": {"input_tokens": 9, "output_tokens": 2}}
ASK = {"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "Capital?"}]}


def event(name: str, data: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


START = event("message_start", {"type": "message_start", "message": MESSAGE | {
    "content": [], "usage": {"input_tokens": 9, "output_tokens": 0}}})
DELTA = event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                      "delta": {"type": "text_delta", "text": "Paris"}})
END = event("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                              "usage": {"output_tokens": 2}}) + \
    event("message_stop", {"type": "message_stop"})


def worker(stream_parts: list[Any], plain: Any = MESSAGE):
    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "served", "parent": None}]})
        body = orjson.loads(request.content)
        assert body["model"] == "served"  # the name the worker serves, not the Fireworks id
        if body.get("stream"):
            return httpx.Response(200, headers={"content-type": "text/event-stream"},
                                  stream=Stream(list(stream_parts)))
        return httpx.Response(200, json=plain)
    return handle


def app_over(tmp_path: Path, bad: Any, good: Any) -> Harness:
    return build(tmp_path, lambda r: bad(r) if r.url.host == "bad" else good(r),
                 hosts=("bad", "good"), listed_order=True, eject_after_failures=100)


async def post(app: Harness, body: dict[str, Any], key: str = KEY) -> httpx.Response:
    return await app.once("POST", "/inference/v1/messages", json=body, key=None,
                          headers={"x-api-key": key})


async def test_a_plain_message_and_its_usage_record(tmp_path: Path) -> None:
    app = app_over(tmp_path, worker([]), worker([]))
    response = await post(app, ASK)
    assert response.status_code == 200
    assert response.json()["content"][0]["text"] == "Paris"
    assert response.json()["model"] == MODEL
    (record,) = app.gateway.ledger.kept
    assert (record.prompt_tokens, record.completion_tokens, record.status) == (9, 2, "ok")


async def test_a_broken_stream_before_the_first_token_fails_over(tmp_path: Path) -> None:
    broken = worker([b"event: error\ndata: {\"type\": \"error\"}\n\n"])
    app = app_over(tmp_path, broken, worker([START, DELTA, END]))
    response = await post(app, ASK | {"stream": True})
    assert response.status_code == 200
    assert "event: message_stop" in response.text and '"text":"Paris"' in response.text
    assert [r.url.host for r in app.workers.served.requests if "messages" in r.url.path] \
        == ["bad", "good"]
    (record,) = app.gateway.ledger.kept
    assert (record.prompt_tokens, record.completion_tokens) == (9, 2)


async def test_a_stream_cut_after_the_first_token_ends_with_an_error_event(
        tmp_path: Path) -> None:
    cut = worker([START, DELTA])  # no message_stop: the connection ends
    app = app_over(tmp_path, cut, cut)
    response = await post(app, ASK | {"stream": True})
    assert response.status_code == 200
    last = response.text.strip().split("\n\n")[-1]
    assert last.startswith("event: error")
    assert orjson.loads(last.split("data: ", 1)[1])["type"] == "error"
    (record,) = app.gateway.ledger.kept
    assert record.status == "error"


async def test_errors_have_anthropics_shape(tmp_path: Path) -> None:
    app = app_over(tmp_path, worker([]), worker([]))
    for body, key, status, kind in ((ASK, "nope", 401, "authentication_error"),
                                    (ASK | {"model": "accounts/x/models/y"}, KEY, 404,
                                     "not_found_error"),
                                    ({"model": MODEL, "messages": []}, KEY, 400,
                                     "invalid_request_error")):
        response = await post(app, body, key)
        assert response.status_code == status
        assert response.json() == {"type": "error", "error": {
            "type": kind, "message": response.json()["error"]["message"]}}
