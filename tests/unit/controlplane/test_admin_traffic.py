"""Routers and budgets through the admin API (and its CLI), in one process with scripted
workers: a router made, used, listed and deleted; budgets set, spent, refused with the
Fireworks envelope and a retry-after to the window's end, shadowed, and read back."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
from typer.testing import CliRunner

from gateway.controlplane import admin_cli
from gateway.controlplane.budgets import window
from tests.unit.fake_worker import MODEL
from tests.unit.harness import ADMIN, COMPLETION, auth, serving, shared_deployment

USAGE_OF_COMPLETION = 5  # COMPLETION's usage: 3 prompt, 2 completion tokens


async def test_a_router_is_made_used_listed_and_deleted(tmp_path: Path) -> None:
    h = shared_deployment(tmp_path, lambda r: httpx.Response(200, json=COMPLETION))
    admin, w2 = auth(ADMIN), h.urls["w2"]
    router = "accounts/fireworks/routers/r"
    async with h.running() as client:
        missing = await client.put("/admin/v1/accounts/fireworks/routers/r", headers=admin,
                                   json={"model": MODEL, "deployments": [{"deployment": "x"}]})
        assert missing.status_code == 404 and "x" in missing.json()["error"]["message"]
        await client.put("/admin/v1/accounts/fireworks/deployments/d2", headers=admin,
                         json={"model": MODEL, "replicas": [{"url": w2}]})
        made = await client.put("/admin/v1/accounts/fireworks/routers/r", headers=admin,
                                json={"model": MODEL, "default": True,
                                      "strategy": "even-load",
                                      "deployments": [{"deployment": "d", "weight": 2},
                                                      {"deployment": "d2"}]})
        assert made.status_code == 200 and made.json()["name"] == router
        deployments = (await client.get("/admin/v1/accounts/fireworks/deployments",
                                        headers=admin)).json()["deployments"]
        assert not any(d["default"] for d in deployments)  # the router took the flag
        served = await client.post("/v1/completions", headers=auth(),
                                   json={"model": MODEL, "prompt": "x"})  # the default
        assert served.headers["fireworks-router"] == router
        bad = await client.put("/admin/v1/accounts/fireworks/routers/r2", headers=admin,
                               json={"model": MODEL, "strategy": "round-robin",
                                     "deployments": [{"deployment": "d"}]})
        assert bad.status_code == 400
        listed = await client.get("/v1/models", headers=auth())
        assert router in [m["id"] for m in listed.json()["data"]]
        deleted = await client.delete("/admin/v1/accounts/fireworks/routers/r", headers=admin)
        assert deleted.status_code == 200
        gone = await client.post("/v1/completions", headers=auth(),
                                 json={"model": router, "prompt": "x"})
        assert gone.status_code == 404


def budgets_body(**budget: Any) -> dict[str, Any]:
    return {"budgets": [{"name": "daily", "window": "day", "tokens": 10} | budget]}


async def test_a_spent_budget_answers_429_until_the_window_ends(tmp_path: Path) -> None:
    h = shared_deployment(tmp_path, lambda r: httpx.Response(200, json=COMPLETION))
    admin = auth(ADMIN)
    body = {"model": MODEL, "prompt": "x", "max_tokens": 2}
    async with h.running() as client:
        put = await client.put("/admin/v1/accounts/fireworks/budgets", headers=admin,
                               json=budgets_body(input_weight=0, cached_weight=0))
        assert put.status_code == 200, put.text
        answers = [await client.post("/v1/completions", headers=auth(), json=body)
                   for _ in range(7)]
        read = (await client.get("/admin/v1/accounts/fireworks/budgets",
                                 headers=admin)).json()
        metrics = (await client.get("/metrics", headers=admin)).text
        twice = await client.put("/admin/v1/accounts/fireworks/budgets", headers=admin,
                                 json={"budgets": [budgets_body()["budgets"][0]] * 2})
    assert [a.status_code for a in answers] == [200] * 5 + [429] * 2
    refused = answers[-1]
    error = refused.json()["error"]
    assert error["code"] == "RESOURCE_EXHAUSTED" and "budget 'daily'" in error["message"]
    _, ends = window("day", time.time())
    assert abs(int(refused.headers["retry-after"]) - (ends - time.time())) <= 2
    (budget,) = read["budgets"]
    assert (budget["spent"], budget["remaining"], budget["refused"]) == (10, 0, 2)
    assert budget["resets_at"] == ends
    assert ('fwgw_budget_refusals_total{account="fireworks",budget="daily",mode="enforce"} '
            '2.0') in metrics
    assert twice.status_code == 400  # two budgets of one name


async def test_a_shadow_budget_refuses_nothing_and_reports(tmp_path: Path) -> None:
    h = shared_deployment(tmp_path, lambda r: httpx.Response(200, json=COMPLETION))
    admin = auth(ADMIN)
    async with h.running() as client:
        await client.put("/admin/v1/accounts/fireworks/budgets", headers=admin,
                         json=budgets_body(shadow=True))
        answers = [await client.post("/v1/completions", headers=auth(),
                                     json={"model": MODEL, "prompt": "x", "max_tokens": 2})
                   for _ in range(6)]
        read = (await client.get("/admin/v1/accounts/fireworks/budgets",
                                 headers=admin)).json()
        metrics = (await client.get("/metrics", headers=admin)).text
    assert all(a.status_code == 200 for a in answers)
    (budget,) = read["budgets"]
    assert budget["spent"] == 6 * USAGE_OF_COMPLETION and budget["shadow_refused"] >= 3
    assert 'mode="shadow"' in metrics and "fwgw_budget_spent_tokens" in metrics


async def test_the_cli_sets_budgets_and_routers(tmp_path: Path) -> None:
    h = shared_deployment(tmp_path, lambda r: httpx.Response(200, json=COMPLETION))
    async with serving(h, "httptools") as (host, port):
        url = f"http://{host}:{port}"
        common = ["--url", url, "--admin-key", ADMIN]

        def run(*args: str) -> str:
            result = CliRunner().invoke(admin_cli.app, [*args, *common])
            assert result.exit_code == 0, result.output
            return result.output

        await asyncio.to_thread(run, "budgets", "put", "acme", "monthly", "--window", "month",
                                "--tokens", "1000", "--cached-weight", "0.5")
        await asyncio.to_thread(run, "budgets", "put", "acme", "daily", "--window", "day",
                                "--tokens", "50", "--shadow")
        shown = await asyncio.to_thread(run, "budgets", "delete", "acme", "monthly")
        await asyncio.to_thread(run, "routers", "put", "fireworks", "r", "--model", MODEL,
                                "--deployment", "d=3")
        routers = await asyncio.to_thread(run, "routers", "list", "fireworks")
    assert '"daily"' in shown and '"monthly"' not in shown and '"shadow": true' in shown
    assert '"weight": 3' in routers and "accounts/fireworks/routers/r" in routers
