"""Replica health on a deployment that many accounts share, with scripted workers: what one
account's requests cause is not counted against the replicas, ejection is capped per
deployment, and with every replica ejected requests go to all of them (panic mode)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx

from tests.unit.fake_worker import KEY, MODEL
from tests.unit.harness import (
    ADMIN,
    COMPLETION,
    OTHER_KEY,
    Harness,
    auth,
    shared_deployment,
)

DEPLOYMENT = 'deployment="accounts/fireworks/deployments/d"'


def trips_the_engine(request: httpx.Request) -> bool:
    """A worker that fails one input with a 500, as an engine with a bug for it would."""
    return b"TRIP" in request.content


async def test_one_accounts_bad_requests_eject_nothing(tmp_path: Path) -> None:
    """The scenario of a shared deployment: account `other` sends requests that every
    worker fails; the replicas stay in rotation, and `fireworks` never sees a 503."""
    def handler(request: httpx.Request) -> httpx.Response:
        if trips_the_engine(request):
            return httpx.Response(500, json={"error": {"message": "engine bug"}})
        return httpx.Response(200, json=COMPLETION)

    h = shared_deployment(tmp_path, handler)
    async with h.running() as client:
        for _ in range(4):  # the bad account
            bad = await client.post("/v1/completions", headers=auth(OTHER_KEY),
                                    json={"model": MODEL, "prompt": "TRIP"})
            assert bad.status_code >= 500
        statuses = [(await client.post("/v1/completions", headers=auth(KEY),
                                       json={"model": MODEL, "prompt": "x"})).status_code
                    for _ in range(50)]
        metrics = (await client.get("/metrics", headers=auth(ADMIN))).text
    assert statuses == [200] * 50
    health = h.gateway.replicas.health
    assert all(health.is_healthy(url) for url in h.workers.urls.values())
    assert f"fwgw_request_caused_failures_total{{{DEPLOYMENT}}} 4.0" in metrics


async def test_a_replica_that_fails_every_request_is_still_ejected(tmp_path: Path) -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.host)
        if request.url.host == "w1":
            return httpx.Response(500, json={"error": {"message": "broken"}})
        return httpx.Response(200, json=COMPLETION)

    h = shared_deployment(tmp_path, handler)
    async with h.running() as client:
        for _ in range(6):
            response = await client.post("/v1/completions", headers=auth(KEY),
                                         json={"model": MODEL, "prompt": "x"})
            assert response.status_code == 200  # retried on w2
    assert seen.count("w1") == 2  # two failed answers, each answered well by w2: ejected
    urls = h.workers.urls
    assert not h.gateway.replicas.health.is_healthy(urls["w1"])


async def eject_both(h: Harness) -> None:
    """Both replicas ejected, w1 first (as the active checks would)."""
    health = h.gateway.replicas.health  # type: ignore[attr-defined]
    for host in ("w1", "w2"):
        for _ in range(health.eject_after):
            health.failure(h.workers.urls[host])  # type: ignore[attr-defined]
        time.sleep(0.01)  # distinct ejection times


async def test_ejection_is_capped_per_deployment(tmp_path: Path) -> None:
    """With the default cap (50%), one of two replicas may be ejected: of two ejected, the
    one ejected last stays in rotation."""
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.host)
        return httpx.Response(200, json=COMPLETION)

    h = shared_deployment(tmp_path, handler)
    async with h.running() as client:
        await eject_both(h)
        for _ in range(3):
            response = await client.post("/v1/completions", headers=auth(KEY),
                                         json={"model": MODEL, "prompt": "x"})
            assert response.status_code == 200
    assert seen == ["w2"] * 3


async def test_panic_mode_routes_to_all_rather_than_503(tmp_path: Path) -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.host)
        return httpx.Response(200, json=COMPLETION)

    h = shared_deployment(tmp_path, handler, max_ejection_percent=100)
    async with h.running() as client:
        await eject_both(h)
        for _ in range(4):
            response = await client.post("/v1/completions", headers=auth(KEY),
                                         json={"model": MODEL, "prompt": "x"})
            assert response.status_code == 200, response.text
        metrics = (await client.get("/metrics", headers=auth(ADMIN))).text
    assert seen  # served by the ejected replicas, not refused
    assert f"fwgw_panic_mode_entries_total{{{DEPLOYMENT}}} 1.0" in metrics  # entered once


async def test_a_request_the_second_replica_refuses_blames_no_replica(
        tmp_path: Path) -> None:
    """w1 fails the request with a 500; w2 says it is invalid (400): the request was bad."""
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "w1":
            return httpx.Response(500, json={"error": {"message": "engine bug"}})
        return httpx.Response(400, json={"error": {"message": json.dumps("bad input")}})

    h = shared_deployment(tmp_path, handler)
    async with h.running() as client:
        for _ in range(3):
            response = await client.post("/v1/completions", headers=auth(OTHER_KEY),
                                         json={"model": MODEL, "prompt": "x"})
            assert response.status_code == 400
    states = h.gateway.replicas.health.states
    assert all(state.failures == 0 for state in states.values())
