"""Routers, fallbacks and budgets end to end: real vLLM workers (SmolLM2 with the plugins,
SmolLM2 on stock vLLM, the tiny Llama with a 128-token context), two gateway processes over
one real redis-server.

- a weighted router over two deployments on two workers holds its weights over 1,000
  requests; an even-load router sends new requests away from a worker kept busy;
- a deployment whose queue is full passes requests to its fallback; one whose worker refuses
  a prompt as longer than its context passes it to a deployment with a longer one;
- budgets across both gateways: concurrent clients, exactly the budget admitted, the rest
  429 with a retry-after to the day's end; a shadow budget refuses nothing and counts."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
import yaml

from engine_plugins.models import prepare_tiny
from gateway.controlplane.budgets import window
from gateway.controlplane.redis_ledger import read_records
from gateway.controlplane.registry import hash_key
from gateway.controlplane.usage import UsageRecord
from gateway.local_stack import Child
from tests.conftest import free_port
from tests.e2e.conftest import API_KEY
from tests.e2e.processes import (
    kept_busy,
    log_tails,
    start_gateway,
    start_worker,
    wait_idle,
    wait_loads_read,
)
from tests.redis_server import RedisServer

pytestmark = pytest.mark.e2e
MODEL = "accounts/fireworks/models/routed"
SHORT = "accounts/fireworks/models/short"
BLUE, GREEN = "accounts/fireworks/deployments/blue", "accounts/fireworks/deployments/green"
CANARY, EVEN = "accounts/fireworks/routers/canary", "accounts/fireworks/routers/even"
PRIMARY = "accounts/fireworks/deployments/primary"
TINY, LONG = "accounts/fireworks/deployments/tiny", "accounts/fireworks/deployments/long"
BUDGETED, WATCHED, ADMIN = "fw_budgeted_key", "fw_watched_key", "e2e-admin"
BUDGET_TOKENS, MAX_TOKENS = 40, 4  # output-only: ten requests of 4 tokens


@dataclass
class Scene:
    urls: list[str]  # two gateways sharing Redis
    workers: tuple[str, str, str]  # plugins, stock, tiny
    redis_url: str
    prefix: str


@pytest.fixture(scope="module")
def tiny_worker(data_dir: Path) -> Iterator[str]:
    port = free_port()
    worker = start_worker(prepare_tiny(data_dir), port, "--max-model-len", "128",
                          "--served-model-name", "tiny", plugins=False)
    yield f"http://127.0.0.1:{port}"
    worker.stop()


def registry(a: str, b: str, tiny: str) -> dict[str, Any]:
    def deployment(name: str, url: str, **fields: Any) -> dict[str, Any]:
        return {"id": name, "account": "fireworks", "model": MODEL,
                "context_length": 2048, "replicas": [{"url": url}]} | fields

    output_only = {"name": "daily", "window": "day", "tokens": BUDGET_TOKENS,
                   "input_weight": 0, "cached_weight": 0}
    return {
        "accounts": [
            {"id": "fireworks", "api_keys": [hash_key(API_KEY)]},
            {"id": "budgeted", "api_keys": [hash_key(BUDGETED)], "budgets": [output_only]},
            {"id": "watched", "api_keys": [hash_key(WATCHED)],
             "budgets": [output_only | {"shadow": True}]}],
        "deployments": [
            deployment("blue", a, default=True), deployment("green", b),
            deployment("primary", a, model="accounts/fireworks/models/primary",
                       default=True, queue_replica_load=1, fallbacks=[GREEN]),
            deployment("tiny", tiny, model=SHORT, default=True, context_length=128,
                       fallbacks=[LONG]),
            deployment("long", a, model=SHORT)],
        "routers": [
            {"id": "canary", "account": "fireworks", "model": MODEL,
             "deployments": [{"deployment": "blue", "weight": 3},
                             {"deployment": "green", "weight": 1}]},
            {"id": "even", "account": "fireworks", "model": MODEL, "strategy": "even-load",
             "deployments": [{"deployment": "blue"}, {"deployment": "green"}]}]}


@pytest.fixture(scope="module")
def scene(smollm2_worker: str, stock_worker: str, tiny_worker: str,
          redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[Scene]:
    path = tmp_path_factory.mktemp("routing") / "registry.yaml"
    path.write_text(yaml.safe_dump(registry(smollm2_worker, stock_worker, tiny_worker)))
    prefix = f"rt{uuid.uuid4().hex[:6]}:"
    # A full queue sheds at once (primary saturates at one request); the workers' load is
    # read often (even-load); no key derived from the prompt.
    settings = {"redis_url": redis_server.url, "redis_prefix": prefix,
                "queue_max_length": "0", "health_check_interval": "0.3",
                "prefix_affinity_bytes": "0", "admin_key": ADMIN}
    ports = [free_port(), free_port()]
    children: list[Child] = [start_gateway(path, port, **settings) for port in ports]
    yield Scene([f"http://127.0.0.1:{port}" for port in ports],
                (smollm2_worker, stock_worker, tiny_worker), redis_server.url, prefix)
    for child in children:
        child.stop()


async def send(urls: list[str], key: str, bodies: list[dict[str, Any]],
               at_once: int = 16) -> list[httpx.Response]:
    """Each body POSTed to /v1/completions, in turn across the gateways, `at_once` at a
    time."""
    gate = asyncio.Semaphore(at_once)
    async with httpx.AsyncClient(timeout=120,
                                 headers={"Authorization": f"Bearer {key}"}) as client:
        async def one(n: int, body: dict[str, Any]) -> httpx.Response:
            async with gate:
                return await client.post(f"{urls[n % len(urls)]}/inference/v1/completions",
                                         json=body)
        return await asyncio.gather(*(one(n, b) for n, b in enumerate(bodies)))


async def records(scene: Scene) -> list[UsageRecord]:
    client = aioredis.from_url(scene.redis_url)
    try:
        for _ in range(50):  # the last ends reach Redis in the background
            found = await read_records(client, f"{scene.prefix}usage")
            await asyncio.sleep(0.2)
            if found == await read_records(client, f"{scene.prefix}usage"):
                return found
        return found
    finally:
        await client.aclose()


async def test_a_weighted_router_holds_its_weights_over_1000_requests(scene: Scene) -> None:
    bodies = [{"model": CANARY, "prompt": f"Count: {n},", "max_tokens": 1}
              for n in range(1000)]
    started = time.monotonic()
    answers = await send(scene.urls, API_KEY, bodies)
    seconds = time.monotonic() - started
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers
                                                        if a.status_code != 200][:3]
    served = Counter(a.headers["fireworks-deployment"] for a in answers)
    share = served[BLUE] / 1000
    print(f"\nweighted router 3:1 over 1,000 requests: blue {served[BLUE]}, green "
          f"{served[GREEN]} (blue {share:.1%}, expected 75%), {seconds:.1f} s")
    assert abs(share - 0.75) < 0.05, served
    mine = [r for r in await records(scene) if r.router == CANARY]
    assert len(mine) == 1000
    workers = {BLUE: scene.workers[0], GREEN: scene.workers[1]}
    assert all(r.replica == workers[r.deployment] for r in mine)  # on its deployment's worker
    assert Counter(r.deployment for r in mine) == served


async def test_an_even_load_router_avoids_a_worker_kept_busy(scene: Scene) -> None:
    busy = scene.workers[0]  # blue's worker, kept busy by another client
    wait_idle(scene.workers[1], settle=0)
    with kept_busy(busy, streams=4, max_tokens=300):
        await asyncio.to_thread(wait_loads_read, scene.urls, ADMIN, busy, scene.workers[1], 3)
        answers = await send(scene.urls, API_KEY, [
            {"model": EVEN, "prompt": "Hi", "max_tokens": 1} for _ in range(20)], at_once=1)
    served = Counter(a.headers.get("fireworks-deployment") for a in answers)
    assert served[GREEN] >= 18, served


async def test_a_full_queue_passes_requests_to_the_fallback(scene: Scene) -> None:
    wait_idle(scene.workers[0])  # primary saturates at one request
    bodies = [{"model": "accounts/fireworks/models/primary", "prompt": f"Story {n}:",
               "max_tokens": 48, "ignore_eos": True} for n in range(8)]
    answers = await send(scene.urls[:1], API_KEY, bodies, at_once=8)
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    fell = [a for a in answers if "fireworks-fallback" in a.headers]
    assert fell and len(fell) < len(answers), [a.headers for a in answers]
    assert {a.headers["fireworks-fallback"] for a in fell} == {f"shed:{PRIMARY}"}
    assert {a.headers["fireworks-deployment"] for a in fell} == {GREEN}
    mine = [r for r in await records(scene) if r.fallback == f"shed:{PRIMARY}"]
    assert len(mine) == len(fell) and {r.deployment for r in mine} == {GREEN}


async def test_a_prompt_too_long_for_its_context_goes_to_the_longer_one(
        scene: Scene) -> None:
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 40  # > 128 tokens
    short, long = await send(scene.urls[:1], API_KEY, [
        {"model": SHORT, "prompt": "Hi", "max_tokens": 2},
        {"model": SHORT, "prompt": long_prompt, "max_tokens": 2}], at_once=1)
    assert short.status_code == 200 and short.headers["fireworks-deployment"] == TINY
    assert long.status_code == 200, long.text
    assert long.headers["fireworks-deployment"] == LONG
    assert long.headers["fireworks-fallback"] == f"context_length:{TINY}"
    assert long.json()["usage"]["prompt_tokens"] > 128


async def test_two_gateways_admit_exactly_the_budget(scene: Scene) -> None:
    body = {"model": MODEL, "prompt": "Count: 1, 2,", "max_tokens": MAX_TOKENS,
            "ignore_eos": True}
    answers = await send(scene.urls, BUDGETED, [body] * 30, at_once=30)
    statuses = Counter(a.status_code for a in answers)
    assert statuses == {200: BUDGET_TOKENS // MAX_TOKENS, 429: 30 - BUDGET_TOKENS //
                        MAX_TOKENS}, [a.text for a in answers if a.status_code not in (
                            200, 429)] or log_tails(*scene.urls)
    refused = next(a for a in answers if a.status_code == 429)
    assert refused.json()["error"]["code"] == "RESOURCE_EXHAUSTED"
    _, ends = window("day", time.time())
    assert abs(int(refused.headers["retry-after"]) - (ends - time.time())) <= 5
    mine = [r for r in await records(scene) if r.account == "budgeted"]
    assert len(mine) == 10 and sum(r.completion_tokens for r in mine) == BUDGET_TOKENS
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {ADMIN}"}) as admin:
        read = [(await admin.get(f"{url}/admin/v1/accounts/budgeted/budgets")).json()
                for url in scene.urls]
    for seen in read:  # both gateways read the one spend
        (budget,) = seen["budgets"]
        assert (budget["spent"], budget["refused"]) == (BUDGET_TOKENS, 20)


async def test_a_shadow_budget_admits_all_and_counts_what_it_would_refuse(
        scene: Scene) -> None:
    body = {"model": MODEL, "prompt": "Count: 1, 2,", "max_tokens": MAX_TOKENS,
            "ignore_eos": True}
    answers = await send(scene.urls, WATCHED, [body] * 30, at_once=30)
    assert all(a.status_code == 200 for a in answers)
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {ADMIN}"}) as admin:
        (budget,) = (await admin.get(
            f"{scene.urls[1]}/admin/v1/accounts/watched/budgets")).json()["budgets"]
        metrics = "".join([(await admin.get(f"{url}/metrics")).text for url in scene.urls])
    assert (budget["spent"], budget["shadow_refused"], budget["refused"]) == (120, 20, 0)
    assert 'fwgw_budget_refusals_total{account="watched",budget="daily",mode="shadow"}' \
        in metrics
