"""The admin API in one process, with scripted workers: deployments, replicas and keys
managed (and refused when they would poison every gateway), other accounts' deployments
invisible, admin changes refused while Redis is down."""

from __future__ import annotations

from pathlib import Path

import httpx
import yaml

from tests.conftest import free_port
from tests.unit.fake_worker import KEY, MODEL
from tests.unit.harness import ADMIN, COMPLETION, OTHER_KEY, auth, shared_deployment


async def test_admin_api_manages_deployments_and_keys(tmp_path: Path) -> None:
    h = shared_deployment(tmp_path, lambda r: httpx.Response(200, json=COMPLETION))
    admin = auth(ADMIN)
    w1, w2 = h.workers.urls["w1"], h.workers.urls["w2"]
    async with h.running() as client:
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
    h = shared_deployment(tmp_path, lambda r: httpx.Response(200, json=COMPLETION))
    async with h.running() as client:
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


async def test_redis_down_at_start_serves_the_file_and_refuses_admin_changes(
        tmp_path: Path) -> None:
    h = shared_deployment(tmp_path, lambda r: httpx.Response(200, json=COMPLETION),
                      redis_url=f"redis://127.0.0.1:{free_port()}/0")
    async with h.running() as client:
        served = await client.post("/v1/completions", headers=auth(),
                                   json={"model": MODEL, "prompt": "x"})
        change = await client.put("/admin/v1/accounts/fireworks/limits", headers=auth(ADMIN),
                                  json={"requests_per_minute": 5})
        ledger = h.gateway.ledger
        assert ledger.pending == 1  # the usage record waits for Redis
        backlog = ledger.backlog()
        assert backlog.records == 1 and 0 <= backlog.oldest_seconds < 5
        ledger.records.then.clear()  # (so that shutdown does not wait for it)
        ledger.pending = 0
    assert served.status_code == 200
    assert change.status_code == 503 and change.headers["retry-after"] == "1"
