"""Adding an API is one object: a toy API (`/reverse`, text reversed by the gateway) added to
the route table, with no change to the data plane, gets everything the data plane gives every
API: keys, model resolution, limits and usage records, failover before the first byte, the
held-stream relay with the API's own framing and error event, and its own error envelope."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from pydantic import BaseModel, ConfigDict

from gateway.api import Api, Call, Framing, Reply, Served, Worker, worker_json
from gateway.app import inference_apis
from gateway.config import Settings
from gateway.controlplane.registry import Route
from gateway.errors import GatewayError, WorkerFault
from tests.unit.fake_worker import KEY, MODEL, RESET, Stream
from tests.unit.harness import Harness, build


class ReverseRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    text: str
    stream: bool = False


class ReverseApi(Api):
    path = "/reverse"
    worker_path = "/v1/reverse"
    request_model: type[BaseModel] = ReverseRequest

    def translate(self, request: ReverseRequest, route: Route, settings: Settings, *,
                  account: str, nonce: str) -> ReverseCall:
        return ReverseCall(body={"text": request.text, "stream": request.stream},
                           stream=request.stream, max_tokens=1)

    def error_body(self, exc: GatewayError, request_id: str) -> dict[str, Any]:
        return {"toy_error": exc.status}


@dataclass(kw_only=True)
class ReverseCall(Call):
    def prompt_estimate(self) -> int:
        return len(self.body["text"])

    def prefix_material(self, limit: int) -> bytes | None:
        return str(self.body["text"]).encode()[:limit]

    async def reply(self, raw: bytes, worker: Worker, served: Served) -> Reply:
        data = worker_json(raw)
        if not isinstance(data, dict) or not isinstance(data.get("text"), str):
            raise WorkerFault("no text")
        served.first_token()
        served.usage = {"prompt_tokens": len(self.body["text"]),
                        "completion_tokens": len(data["text"])}
        return Reply(orjson.dumps({"reversed": data["text"][::-1]}), [(b"x-toy", b"1")])

    def framing(self, worker: Worker, served: Served) -> ReverseFraming:
        return ReverseFraming(served)


@dataclass
class ReverseFraming(Framing):
    served: Served

    async def take(self, events: list[tuple[str, bytes]]) -> list[bytes]:
        parts = []
        for name, data in events:
            if name == "end":
                self.done = True
                parts.append(b"event: end\n\n")
                break
            self.ready = True
            self.served.first_token()
            parts.append(b"data: " + data[::-1] + b"\n\n")
        return parts

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"x-toy", b"stream")]

    def error_event(self, exc: GatewayError, request_id: str) -> bytes:
        return b"event: oops\ndata: %d\n\n" % exc.status


def handler(request: httpx.Request) -> httpx.Response:
    assert request.url.path == "/v1/reverse"
    body = orjson.loads(request.content)
    if request.url.host == "bad":
        return httpx.Response(500, json={"error": "down"})
    if body["stream"]:
        parts: list[Any] = [b"data: ab\n\n", b"data: cd\n\n"]
        parts.append(RESET if body["text"] == "cut" else b"event: end\ndata: \n\n")
        return httpx.Response(200, headers={"content-type": "text/event-stream"},
                              stream=Stream(parts))
    return httpx.Response(200, json={"text": body["text"]})


@pytest.fixture
def app(tmp_path: Path) -> Harness:
    return build(tmp_path, handler, hosts=("bad", "good"), listed_order=True,
                 apis=lambda stored: [*inference_apis(stored), ReverseApi()],
                 eject_after_failures=100)


async def post(app: Harness, body: dict[str, Any], key: str = KEY) -> httpx.Response:
    return await app.once("POST", "/inference/v1/reverse", json=body, key=key)


async def test_a_plain_request_fails_over_and_is_recorded(app: Harness) -> None:
    response = await post(app, {"model": MODEL, "text": "hello"})
    assert response.status_code == 200 and response.json() == {"reversed": "olleh"}
    assert response.headers["x-toy"] == "1"
    (record,) = app.gateway.ledger.kept
    assert (record.endpoint, record.status, record.prompt_tokens, record.completion_tokens) \
        == ("/v1/reverse", "ok", 5, 5)
    hosts = [r.url.host for r in app.workers.served.requests]
    assert hosts == ["bad", "good"]  # the bad replica's 500, then the other one


async def test_a_stream_through_the_shared_relay(app: Harness) -> None:
    response = await post(app, {"model": MODEL, "text": "x", "stream": True})
    assert response.status_code == 200 and response.headers["x-toy"] == "stream"
    assert response.text == "data: ba\n\ndata: dc\n\nevent: end\n\n"
    cut = await post(app, {"model": MODEL, "text": "cut", "stream": True})
    assert cut.text == "data: ba\n\ndata: dc\n\nevent: oops\ndata: 502\n\n"
    statuses = [(r.status, r.http_status) for r in app.gateway.ledger.kept]
    assert statuses == [("ok", 200), ("error", 502)]


async def test_its_own_error_envelope(app: Harness) -> None:
    unknown = await post(app, {"model": "accounts/fireworks/models/nope", "text": "x"})
    assert unknown.status_code == 404 and unknown.json() == {"toy_error": 404}
    assert (await post(app, {"model": MODEL, "text": "x"}, key="wrong")).json() == \
        {"toy_error": 401}
    assert (await post(app, {"model": MODEL, "text": "x", "extra": 1})).json() == \
        {"toy_error": 400}
