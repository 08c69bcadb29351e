"""Limits and usage records in one process, with scripted workers: a limit refuses with the
Fireworks envelope and headers, every admitted request leaves one record, and requests are
refused while records cannot be written."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from gateway.controlplane.usage import LocalLedger
from tests.unit.fake_worker import MODEL
from tests.unit.harness import ADMIN, COMPLETION, auth, shared_deployment


async def test_local_limits_and_usage_records(tmp_path: Path) -> None:
    h = shared_deployment(tmp_path, lambda r: httpx.Response(200, json=COMPLETION))
    async with h.running() as client:
        limits = await client.put("/admin/v1/accounts/fireworks/limits", headers=auth(ADMIN),
                                  json={"requests_per_minute": 2})
        assert limits.status_code == 200
        statuses = [(await client.post("/v1/completions", headers=auth(),
                                       json={"model": MODEL, "prompt": "x"})) for _ in range(3)]
        usage = (await client.get("/admin/v1/usage", headers=auth(ADMIN))).json()
        unknown = await client.post("/v1/completions", headers=auth(),
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
    ledger: LocalLedger = h.gateway.ledger
    assert [r.completion_tokens for r in ledger.kept] == [2, 2]
    assert usage["accounts"]["fireworks"]["completion_tokens"] == 4


async def test_requests_are_refused_while_usage_records_cannot_be_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    h = shared_deployment(tmp_path, lambda r: httpx.Response(200, json=COMPLETION))
    ledger = h.gateway.ledger
    monkeypatch.setattr(type(ledger), "backlogged", property(lambda self: True))
    async with h.running() as client:
        refused = await client.post("/v1/completions", headers=auth(),
                                    json={"model": MODEL, "prompt": "x"})
    assert refused.status_code == 503 and "Usage records" in refused.json()["error"]["message"]
    assert h.workers.served.requests == [] and not ledger.kept
