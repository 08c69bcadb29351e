"""Draining a replica through the admin API: new requests go elsewhere, a stream already on it
finishes there, and it comes back when undrained (scripted workers on real sockets)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import orjson

from gateway.server.protocol import EdgeProtocol
from tests.unit.fake_worker import KEY, MODEL, Pause, Stream, chunk
from tests.unit.harness import ADMIN, Harness, auth, build, registry, serving

USAGE = {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
DRAIN = "/admin/v1/accounts/fireworks/deployments/d/replicas/drain"


def handler(request: httpx.Request) -> httpx.Response:
    if orjson.loads(request.content).get("stream"):
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=Stream(
            [chunk("a"), Pause(0.3), chunk("b"), chunk("c", "stop"), chunk(usage=USAGE),
             b"data: [DONE]\n\n"]))
    return httpx.Response(200, json={"id": "c", "object": "text_completion", "created": 1,
                                     "usage": USAGE, "choices": [
                                         {"index": 0, "text": "ok", "finish_reason": "stop"}]})


def app(tmp_path: Path) -> Harness:
    return build(tmp_path, handler, hosts=("w1", "w2"),
                 registry_of=lambda urls: registry([urls["w1"], urls["w2"]]),
                 listed_order=True, admin_key=ADMIN, registry_poll_interval=0.05)


async def hosts_of(client: httpx.AsyncClient, h: Harness, count: int) -> list[str]:
    before = len(h.workers.served.requests)
    for _ in range(count):
        answer = await client.post("/v1/completions", headers=auth(KEY),
                                   json={"model": MODEL, "prompt": "x"})
        assert answer.status_code == 200
    return [r.url.host for r in h.workers.served.requests[before:]]


async def test_a_drained_replica_gets_no_new_request_and_comes_back(tmp_path: Path) -> None:
    h = app(tmp_path)
    async with h.running() as client:
        assert "w1" in await hosts_of(client, h, 4)
        drained = await client.put(DRAIN, headers=auth(ADMIN),
                                   json={"url": h.workers.urls["w1"]})
        assert drained.status_code == 200, drained.text
        shown = {r["url"]: r.get("draining") for r in drained.json()["replicas"]}
        assert shown == {h.workers.urls["w1"]: True, h.workers.urls["w2"]: False}
        assert set(await hosts_of(client, h, 6)) == {"w2"}
        back = await client.put(DRAIN, headers=auth(ADMIN),
                                json={"url": h.workers.urls["w1"], "draining": False})
        assert back.status_code == 200
        assert "w1" in await hosts_of(client, h, 4)


async def test_a_stream_on_a_replica_being_drained_finishes_there(tmp_path: Path) -> None:
    h = app(tmp_path)
    async with serving(h, EdgeProtocol) as (host, port), httpx.AsyncClient(
            base_url=f"http://{host}:{port}") as client:
        async with client.stream("POST", "/v1/completions", headers=auth(KEY), json={
                "model": MODEL, "prompt": "x", "stream": True}) as response:
            lines = response.aiter_lines()
            first = await anext(lines)
            assert first.startswith("data: ")  # the stream has started, on w1
            drained = await client.put(DRAIN, headers=auth(ADMIN),
                                       json={"url": h.workers.urls["w1"]})
            assert drained.status_code == 200
            rest = [line async for line in lines]
        texts = [orjson.loads(line[6:])["choices"][0]["text"] for line in [first, *rest]
                 if line.startswith("data: {")]
        assert texts == ["a", "b", "c"] and "data: [DONE]" in rest
    assert [r.url.host for r in h.workers.served.requests] == ["w1"]
    (record,) = h.gateway.ledger.kept
    assert (record.status, record.replica) == ("ok", h.workers.urls["w1"])


async def test_draining_is_the_admins_and_names_a_listed_replica(tmp_path: Path) -> None:
    h = app(tmp_path)
    async with h.running() as client:
        url = h.workers.urls["w1"]
        refused: Any = await client.put(DRAIN, headers=auth(KEY), json={"url": url})
        assert refused.status_code == 401
        unknown = await client.put(DRAIN, headers=auth(ADMIN), json={"url": "http://w9"})
        assert unknown.status_code == 404
        odd = await client.put(DRAIN, headers=auth(ADMIN), json={"url": url, "x": 1})
        assert odd.status_code == 400
