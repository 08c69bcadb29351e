"""Failover with scripted workers: a replica that cannot be reached is retried elsewhere and
ejected, nothing is retried after the first byte, active health checks eject and readmit,
and one failed request counts as one failure."""

from __future__ import annotations

from pathlib import Path

import httpx

from gateway.dataplane.health import HealthChecker
from tests.conftest import free_port
from tests.unit.fake_worker import MODEL, RESET, Stream, chunk
from tests.unit.harness import ADMIN, COMPLETION, auth, build, registry, shared_deployment


async def test_a_dead_replica_is_retried_elsewhere_then_ejected(tmp_path: Path) -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.host)
        if request.url.host == "w1":
            raise httpx.ConnectError("refused")
        return httpx.Response(200, json=COMPLETION)

    h = shared_deployment(tmp_path, handler)
    async with h.running() as client:
        for _ in range(4):
            response = await client.post("/v1/completions", headers=auth(),
                                         json={"model": MODEL, "prompt": "x"})
            assert response.status_code == 200
        metrics = (await client.get("/metrics", headers=auth(ADMIN))).text
    urls = h.workers.urls
    assert seen.count("w1") == 2  # two failures eject it; later requests go to w2 only
    assert f'fwgw_replica_healthy{{replica="{urls["w1"]}"}} 0.0' in metrics
    assert 'fwgw_retries_total{deployment="accounts/fireworks/deployments/d"} 2.0' in metrics
    records = h.gateway.ledger.kept
    assert len(records) == 4 and {r.replica for r in records} == {urls["w2"]}


async def test_no_retry_after_the_first_byte(tmp_path: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=Stream([chunk("a"), RESET]))

    h = shared_deployment(tmp_path, handler)
    async with h.running() as client:
        response = await client.post("/v1/completions", headers=auth(),
                                     json={"model": MODEL, "prompt": "x", "stream": True})
    assert response.status_code == 200 and "event: error" in response.text
    (record,) = h.gateway.ledger.kept
    assert (record.status, record.http_status) == ("error", 502)


async def test_active_health_checks_eject_and_readmit(tmp_path: Path) -> None:
    up = {"w1": False}

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health":
            if not up.get(request.url.host, True):
                raise httpx.ConnectError("down")
            return httpx.Response(200)
        return httpx.Response(200, json=COMPLETION)

    h = shared_deployment(tmp_path, handler)
    gateway = h.gateway
    w1, w2 = h.workers.urls["w1"], h.workers.urls["w2"]
    checker = HealthChecker(gateway.replicas.health, lambda: [w1, w2], gateway.workers.get)
    await checker.check_all()
    await checker.check_all()
    assert not gateway.replicas.health.is_healthy(w1)
    assert gateway.replicas.health.is_healthy(w2)
    up["w1"] = True
    await checker.check_all()
    assert gateway.replicas.health.is_healthy(w1)
    await gateway.workers.aclose()


async def test_one_failed_request_is_one_failure(tmp_path: Path) -> None:
    refused = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    h = build(tmp_path, registry_of=registry([refused]))
    async with h.running() as client:  # one replica: nowhere to retry
        response = await client.post("/v1/completions", headers=auth(),
                                     json={"model": MODEL, "prompt": "x"})
    assert response.status_code == 503
    assert response.json()["error"]["message"] == "No worker reachable for this deployment"
    state = h.gateway.replicas.health.states[refused]
    assert (state.failures, state.healthy) == (1, True)
