"""Worker faults seen through the gateway, with a scripted fake worker."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.unit.fake_worker import KEY, MODEL, Stream, chunk, gateway

USAGE = {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}


async def call(app: Any, path: str, body: dict[str, Any]) -> httpx.Response:
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
        return await client.post(path, json={"model": MODEL} | body,
                                 headers={"Authorization": f"Bearer {KEY}"})


def events(response: httpx.Response) -> list[str]:
    return [block for block in response.text.split("\n\n") if block]


async def test_worker_dying_mid_stream_ends_with_error_event(tmp_path: Path) -> None:
    app = gateway(tmp_path, lambda request: httpx.Response(200, stream=Stream([
        chunk("a"), chunk("b"), httpx.ReadError("connection reset")])))
    response = await call(app, "/v1/completions", {"prompt": "x", "stream": True})
    assert response.status_code == 200
    blocks = events(response)
    assert blocks[-1] == "data: [DONE]"
    assert blocks[-2].startswith("event: error\ndata: ")
    error = orjson.loads(blocks[-2].split("data: ", 1)[1])["error"]
    assert error["status_code"] == 502 and error["code"] == "BAD_GATEWAY"


async def test_chat_abort_never_leaks_as_a_finish_reason(tmp_path: Path) -> None:
    app = gateway(tmp_path, lambda request: httpx.Response(200, stream=Stream([
        chunk("a", chat=True), chunk(None, "abort", chat=True), chunk(usage=USAGE)])))
    response = await call(app, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "x"}], "stream": True})
    assert "\"finish_reason\":\"abort\"" not in response.text
    assert events(response)[-2].startswith("event: error")


async def test_completion_abort_becomes_error(tmp_path: Path) -> None:
    app = gateway(tmp_path, lambda request: httpx.Response(200, stream=Stream([
        chunk("a"), chunk("", "abort"), chunk(usage=USAGE)])))
    response = await call(app, "/v1/completions", {"prompt": "x", "stream": True})
    finals = [orjson.loads(b[6:]) for b in events(response)[:-1]]
    assert finals[-1]["choices"][0]["finish_reason"] == "error"
    assert finals[-1]["usage"]["total_tokens"] == 3


@pytest.mark.parametrize("failure,status", [
    (httpx.ConnectError("refused"), 503), (httpx.ReadTimeout("slow"), 504)])
async def test_unreachable_or_slow_worker(tmp_path: Path, failure: Exception,
                                          status: int) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise failure

    response = await call(gateway(tmp_path, handler), "/v1/completions", {"prompt": "x"})
    assert response.status_code == status
    assert response.json()["error"]["type"] == "internal_server_error"
    if status == 503:
        assert response.headers["retry-after"] == "1"


async def test_worker_errors_map_to_4xx_passthrough_and_502(tmp_path: Path) -> None:
    bad = await call(gateway(tmp_path, lambda r: httpx.Response(
        400, json={"error": {"message": "too long"}})), "/v1/completions", {"prompt": "x"})
    assert bad.status_code == 400 and bad.json()["error"]["message"] == "too long"
    assert bad.headers["x-should-retry"] == "false"
    broken = await call(gateway(tmp_path, lambda r: httpx.Response(500, text="boom")),
                        "/v1/completions", {"prompt": "x"})
    assert broken.status_code == 502
    streamed = await call(gateway(tmp_path, lambda r: httpx.Response(500, text="boom")),
                          "/v1/completions", {"prompt": "x", "stream": True})
    assert streamed.status_code == 502  # headers were held: a real status, not an event


async def test_lenient_mode_ignores_unknown_fields(tmp_path: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert b"bogus" not in request.content
        return httpx.Response(200, json={"id": "x", "object": "text_completion", "created": 1,
                                         "choices": [{"index": 0, "text": "hi",
                                                      "finish_reason": "stop"}],
                                         "usage": USAGE})

    strict = await call(gateway(tmp_path, handler), "/v1/completions",
                        {"prompt": "x", "bogus": 1})
    assert strict.status_code == 400
    lenient = await call(gateway(tmp_path, handler, strict_validation=False),
                         "/v1/completions", {"prompt": "x", "bogus": 1})
    assert lenient.status_code == 200 and lenient.json()["choices"][0]["text"] == "hi"
