"""Failover, limits, usage and the admin API in one process, with scripted workers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from gateway.app import create_app
from gateway.config import Settings
from gateway.controlplane.registry import hash_key
from gateway.controlplane.usage import LocalLedger
from tests.unit.fake_worker import RESET, FakeWorkers, Stream, chunk, in_listed_order

KEY, OTHER_KEY, ADMIN = "k-a", "k-b", "admin-secret"
MODEL = "accounts/fireworks/models/m"
USAGE = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
COMPLETION = {"id": "x", "object": "text_completion", "created": 1, "usage": USAGE,
              "choices": [{"index": 0, "text": "hi", "finish_reason": "stop"}]}


def app(tmp_path: Path, handler: Callable[[httpx.Request], httpx.Response],
        **settings: Any) -> Any:
    """The gateway over two fake workers, w1 and w2 (`.workers.urls` has their URLs)."""
    workers = FakeWorkers(handler, hosts=("w1", "w2"))
    w1, w2 = workers.urls["w1"], workers.urls["w2"]
    registry = tmp_path / "registry.yaml"
    registry.write_text(yaml.safe_dump({
        "accounts": [{"id": "fireworks", "api_keys": [hash_key(KEY)]},
                     {"id": "other", "api_keys": [hash_key(OTHER_KEY)]}],
        "deployments": [
            {"id": "d", "account": "fireworks", "model": MODEL, "default": True,
             "replicas": [{"url": w1}, {"url": w2}]},
            {"id": "secret", "account": "other", "model": "accounts/other/models/s",
             "default": True, "replicas": [{"url": w1}]}]}))
    settings = {"health_check_interval": 0, "admin_key": ADMIN} | settings
    gateway_app = create_app(Settings(registry_path=registry, **settings))
    gateway_app.workers = workers
    in_listed_order(gateway_app)
    return gateway_app


class Client:
    def __init__(self, application: Any) -> None:
        self.app = application

    async def __aenter__(self) -> httpx.AsyncClient:
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()
        self._client = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app),
                                         base_url="http://gw")
        return self._client

    async def __aexit__(self, *exc: object) -> None:
        await self._client.aclose()
        await self._lifespan.__aexit__(None, None, None)


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_a_dead_replica_is_retried_elsewhere_then_ejected(tmp_path: Path) -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.host)
        if request.url.host == "w1":
            raise httpx.ConnectError("refused")
        return httpx.Response(200, json=COMPLETION)

    gateway_app = app(tmp_path, handler)
    async with Client(gateway_app) as client:
        for _ in range(4):
            response = await client.post("/v1/completions", headers=auth(KEY),
                                         json={"model": MODEL, "prompt": "x"})
            assert response.status_code == 200
        metrics = (await client.get("/metrics", headers=auth(ADMIN))).text
    urls = gateway_app.workers.urls
    assert seen.count("w1") == 2  # two failures eject it; later requests go to w2 only
    assert f'fwgw_replica_healthy{{replica="{urls["w1"]}"}} 0.0' in metrics
    assert 'fwgw_retries_total{deployment="accounts/fireworks/deployments/d"} 2.0' in metrics
    records = gateway_app.state.gateway.ledger.kept
    assert len(records) == 4 and {r.replica for r in records} == {urls["w2"]}


async def test_no_retry_after_the_first_byte(tmp_path: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=Stream([chunk("a"), RESET]))

    gateway_app = app(tmp_path, handler)
    async with Client(gateway_app) as client:
        response = await client.post("/v1/completions", headers=auth(KEY),
                                     json={"model": MODEL, "prompt": "x", "stream": True})
    assert response.status_code == 200 and "event: error" in response.text
    (record,) = gateway_app.state.gateway.ledger.kept
    assert (record.status, record.http_status) == ("error", 502)


async def test_local_limits_and_usage_records(tmp_path: Path) -> None:
    gateway_app = app(tmp_path, lambda r: httpx.Response(200, json=COMPLETION))
    async with Client(gateway_app) as client:
        limits = await client.put("/admin/v1/accounts/fireworks/limits", headers=auth(ADMIN),
                                  json={"requests_per_minute": 2})
        assert limits.status_code == 200
        statuses = [(await client.post("/v1/completions", headers=auth(KEY),
                                       json={"model": MODEL, "prompt": "x"})) for _ in range(3)]
        usage = (await client.get("/admin/v1/usage", headers=auth(ADMIN))).json()
        unknown = await client.post("/v1/completions", headers=auth(KEY),
                                    json={"model": "accounts/fireworks/models/nope", "prompt": "x"})
        assert unknown.status_code == 404
        metrics = (await client.get("/metrics", headers=auth(ADMIN))).text
    deployment = 'deployment="accounts/fireworks/deployments/d"'
    for line in (f'fwgw_requests_total{{code="200",{deployment},endpoint="/v1/completions"}} 2.0',
                 f'fwgw_requests_total{{code="429",{deployment},endpoint="/v1/completions"}} 1.0',
                 'fwgw_requests_total{code="404",deployment="",endpoint="/v1/completions"} 1.0',
                 f'fwgw_rate_limit_rejections_total{{{deployment},limit="requests"}} 1.0',
                 f'fwgw_tokens_total{{{deployment},kind="completion"}} 4.0',  # sorted labels
                 f'fwgw_requests_in_flight{{{deployment}}} 0.0'):
        assert line in metrics, line
    assert f'fwgw_request_duration_seconds_count{{{deployment}}} 2.0' in metrics
    assert [r.status_code for r in statuses] == [200, 200, 429]
    assert statuses[0].headers["x-ratelimit-remaining-requests"] == "1"
    assert statuses[2].json()["error"]["code"] == "RESOURCE_EXHAUSTED"
    assert int(statuses[2].headers["retry-after"]) >= 1
    ledger: LocalLedger = gateway_app.state.gateway.ledger
    assert [r.completion_tokens for r in ledger.kept] == [2, 2]
    assert usage["accounts"]["fireworks"]["completion_tokens"] == 4


async def test_admin_api_manages_deployments_and_keys(tmp_path: Path) -> None:
    gateway_app = app(tmp_path, lambda r: httpx.Response(200, json=COMPLETION))
    admin = auth(ADMIN)
    w1, w2 = gateway_app.workers.urls["w1"], gateway_app.workers.urls["w2"]
    async with Client(gateway_app) as client:
        created = await client.put("/admin/v1/accounts/acme/deployments/mine", headers=admin,
                                   json={"model": "accounts/acme/models/tuned", "default": True,
                                         "replicas": [{"url": w2}]})
        assert created.status_code == 200, created.text
        key = (await client.post("/admin/v1/accounts/acme/api-keys", headers=admin)).json()
        served = await client.post("/v1/completions", headers=auth(key["api_key"]),
                                   json={"model": "accounts/acme/models/tuned", "prompt": "x"})
        assert served.status_code == 200
        patched = await client.patch("/admin/v1/accounts/acme/deployments/mine", headers=admin,
                                     json={"max_tokens_completion": 3})
        assert patched.json()["max_tokens_completion"] == 3
        added = await client.post("/admin/v1/accounts/acme/deployments/mine/replicas",
                                  headers=admin, json={"url": w1, "kv_events": "tcp://w1:5557"})
        assert [(r["url"], r["kv_events"]) for r in added.json()["replicas"]] == [
            (w2, None), (w1, "tcp://w1:5557")]
        no_events = await client.post("/admin/v1/accounts/acme/deployments/mine/replicas",
                                      headers=admin, json={"url": w1, "kv_events": "w1:5557"})
        assert no_events.status_code == 400 and "kv_events" in no_events.text
        listed = (await client.get("/admin/v1/accounts/acme/deployments", headers=admin)).json()
        assert [d["name"] for d in listed["deployments"]] == ["accounts/acme/deployments/mine"]
        bad = await client.put("/admin/v1/accounts/acme/deployments/x", headers=admin,
                               json={"model": "m", "replicas": "nope"})
        assert bad.status_code == 400
        bad_patch = await client.patch("/admin/v1/accounts/acme/deployments/mine",
                                       headers=admin, json={"state": "sleeping"})
        assert bad_patch.status_code == 400 and "state" in bad_patch.json()["error"]["message"]
        bad_limits = await client.put("/admin/v1/accounts/acme/limits", headers=admin,
                                      json={"requests_per_minute": -1})
        assert bad_limits.status_code == 400
        # What would poison every gateway later is refused now.
        for value in ("NaN", "Infinity", "-Infinity"):
            poisoned = await client.patch(
                "/admin/v1/accounts/acme/deployments/mine", headers=admin | {
                    "content-type": "application/json"},
                content=f'{{"generation_config": {{"temperature": {value}}}}}')
            assert poisoned.status_code == 400, value
        for url in ("http://[::1", "http://h:800l", "http://h:80011", "w1:8000"):
            unusable = await client.post("/admin/v1/accounts/acme/deployments/mine/replicas",
                                         headers=admin, json={"url": url})
            assert unusable.status_code == 400, url
            unusable = await client.put("/admin/v1/accounts/acme/deployments/y", headers=admin,
                                        json={"model": "m", "replicas": [{"url": url}]})
            assert unusable.status_code == 400, url
        status = (await client.get("/admin/v1/registry", headers=admin)).json()
        assert status["problem"] is None and status["deployments"] == 3
        await client.delete(f"/admin/v1/accounts/acme/api-keys/{key['key_id']}", headers=admin)
        revoked = await client.post("/v1/completions", headers=auth(key["api_key"]),
                                    json={"model": "accounts/acme/models/tuned", "prompt": "x"})
        assert revoked.status_code == 401
        deleted = await client.delete("/admin/v1/accounts/acme/deployments/mine",
                                      headers=admin)
        assert deleted.status_code == 200
        missing = await client.get("/admin/v1/accounts/acme/deployments/mine", headers=admin)
        assert missing.status_code == 404
    written = yaml.safe_load((tmp_path / "registry.yaml").read_text())
    assert "acme" in [a["id"] for a in written["accounts"]]  # changes persisted to the file


async def test_cross_account_probes_look_like_missing_deployments(tmp_path: Path) -> None:
    gateway_app = app(tmp_path, lambda r: httpx.Response(200, json=COMPLETION))
    async with Client(gateway_app) as client:
        async def status(model: str, key: str = KEY) -> tuple[int, str]:
            response = await client.post("/v1/completions", headers=auth(key),
                                         json={"model": model, "prompt": "x"})
            return response.status_code, response.json().get("error", {}).get("code", "")

        missing = await status("accounts/other/deployments/nothing-here")
        assert missing == (404, "NOT_FOUND")
        for probe in ("accounts/other/deployments/secret", "accounts/other/models/s",
                      f"{MODEL}#accounts/other/deployments/secret",
                      "accounts/other/models/s#accounts/other/deployments/secret"):
            assert await status(probe) == missing, probe
        assert (await status("accounts/other/models/s", OTHER_KEY))[0] == 200
        for key in (KEY, OTHER_KEY, "", "garbage"):
            admin = await client.get("/admin/v1/accounts", headers=auth(key))
            assert admin.status_code == 401
            changed = await client.put("/admin/v1/accounts/other/limits", headers=auth(key),
                                       json={"requests_per_minute": 1})
            assert changed.status_code == 401


async def test_active_health_checks_eject_and_readmit(tmp_path: Path) -> None:
    up = {"w1": False}

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health":
            if not up.get(request.url.host, True):
                raise httpx.ConnectError("down")
            return httpx.Response(200)
        return httpx.Response(200, json=COMPLETION)

    gateway_app = app(tmp_path, handler)
    gateway = gateway_app.state.gateway
    w1, w2 = gateway_app.workers.urls["w1"], gateway_app.workers.urls["w2"]
    from gateway.dataplane.health import HealthChecker

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
    from tests.conftest import free_port
    from tests.unit.fake_worker import KEY as ONLY_KEY
    from tests.unit.fake_worker import MODEL as ONLY_MODEL
    from tests.unit.fake_worker import registry

    refused = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    gateway_app = create_app(Settings(registry_path=registry(tmp_path, [refused]),
                                      health_check_interval=0))
    async with Client(gateway_app) as client:  # one replica: nowhere to retry
        response = await client.post("/v1/completions", headers=auth(ONLY_KEY),
                                     json={"model": ONLY_MODEL, "prompt": "x"})
    assert response.status_code == 503
    assert response.json()["error"]["message"] == "No worker reachable for this deployment"
    state = gateway_app.state.gateway.replicas.health.states[refused]
    assert (state.failures, state.healthy) == (1, True)


async def test_redis_down_at_start_serves_the_file_and_refuses_admin_changes(
        tmp_path: Path) -> None:
    from tests.conftest import free_port

    gateway_app = app(tmp_path, lambda r: httpx.Response(200, json=COMPLETION),
                      redis_url=f"redis://127.0.0.1:{free_port()}/0")
    async with Client(gateway_app) as client:
        served = await client.post("/v1/completions", headers=auth(KEY),
                                   json={"model": MODEL, "prompt": "x"})
        change = await client.put("/admin/v1/accounts/fireworks/limits", headers=auth(ADMIN),
                                  json={"requests_per_minute": 5})
        ledger = gateway_app.state.gateway.ledger
        assert ledger.pending == 1  # the usage record waits for Redis
        backlog = ledger.backlog()
        assert backlog.records == 1 and 0 <= backlog.oldest_seconds < 5
        ledger.others.clear()  # (so that shutdown does not wait for it)
    assert served.status_code == 200
    assert change.status_code == 503 and change.headers["retry-after"] == "1"


async def test_requests_are_refused_while_usage_records_cannot_be_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gateway_app = app(tmp_path, lambda r: httpx.Response(200, json=COMPLETION))
    ledger = gateway_app.state.gateway.ledger
    monkeypatch.setattr(type(ledger), "backlogged", property(lambda self: True))
    async with Client(gateway_app) as client:
        refused = await client.post("/v1/completions", headers=auth(KEY),
                                    json={"model": MODEL, "prompt": "x"})
    assert refused.status_code == 503 and "Usage records" in refused.json()["error"]["message"]
    assert gateway_app.workers.served.requests == [] and not ledger.kept
