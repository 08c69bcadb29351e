"""Redis at its memory bound, with the registry and limits apart from the bulk data: two real
redis-servers (state: noeviction; bulk: volatile-lru, as the chart runs them) under a gateway.
The bulk instance evicts stored responses to make room and then refuses what it cannot make
room for; the registry and the limits answer all along; the gateway says so in its metrics
and log; nothing refused is lost."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.controlplane.redis_ledger import read_records
from gateway.controlplane.redis_limits import limit_keys
from tests.redis_server import RedisServer
from tests.unit.fake_worker import KEY, MODEL
from tests.unit.fireworks.test_responses import handler
from tests.unit.harness import ADMIN, Harness, auth, build, registry

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest.fixture
async def instances() -> AsyncIterator[tuple[RedisServer, RedisServer]]:
    state, bulk = RedisServer(), RedisServer()
    state.start()
    bulk.start()
    state.client().config_set("maxmemory-policy", "noeviction")
    bulk.client().config_set("maxmemory-policy", "volatile-lru")
    yield state, bulk
    state.stop()
    bulk.stop()


def bound(server: RedisServer, room: int) -> None:
    """maxmemory `room` bytes past what the instance uses now (below it when negative)."""
    client = server.client()
    client.config_set("maxmemory", int(client.info("memory")["used_memory"]) + room)
    client.close()


def sample(h: Harness, name: str, **labels: str) -> float:
    return h.gateway.metrics.registry.get_sample_value(name, labels) or 0.0


async def until(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    for _ in range(int(seconds / 0.05)):
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("not within the time")


async def respond(client: httpx.AsyncClient, text: str, key: str = KEY) -> httpx.Response:
    return await client.post("/inference/v1/responses", headers=auth(key), json={
        "model": MODEL, "input": text, "max_output_tokens": 50})


def limited(urls: dict[str, str]) -> dict[str, Any]:
    content = registry(urls.values())
    content["accounts"][0]["limits"] = {"generated_tokens_per_minute": 100_000}
    return content


async def test_at_its_bound_bulk_redis_evicts_then_refuses_while_registry_and_limits_answer(
        tmp_path: Path, instances: tuple[RedisServer, RedisServer],
        caplog: pytest.LogCaptureFixture) -> None:
    state, bulk = instances
    h = build(tmp_path, handler, registry_of=limited, redis_url=state.url,
              redis_bulk_url=bulk.url, admin_key=ADMIN, redis_memory_interval=0.1)
    caplog.set_level(logging.WARNING, logger="gateway")
    async with h.running() as client:
        # 1. Full of stored responses: the oldest are evicted to make room, said in a
        # metric and a log line; every request is served and its record kept.
        assert (await respond(client, "the usage stream's first record")).status_code == 200
        await until(lambda: h.gateway.ledger.backlog().records == 0)
        bound(bulk, 300_000)
        stored = []
        for n in range(150):
            answer = await respond(client, f"{n:04} " + "x" * 4000)
            assert answer.status_code == 200 and answer.json()["store"]
            stored.append(answer.json()["id"])
        await until(lambda: sample(h, "fwgw_redis_evicted_keys_total", instance="bulk") > 0)
        assert "Redis bulk is at its memory bound" in caplog.text
        first = await client.get(f"/inference/v1/responses/{stored[0]}", headers=auth())
        last = await client.get(f"/inference/v1/responses/{stored[-1]}", headers=auth())
        assert (first.status_code, last.status_code) == (404, 200)
        await until(lambda: h.gateway.ledger.backlog().records == 0)

        # 2. Full of what it may not evict (here a filler, standing for usage records):
        # new bulk writes are refused, said in a metric and a log line.
        filler = bulk.client()
        filler.config_set("maxmemory", 0)
        filler.set("filler", b"f" * 2_000_000)
        bound(bulk, -1_000_000)  # more than it may evict past its bound
        refused = await respond(client, "one more")
        assert refused.status_code == 200 and refused.json()["store"] is False
        assert sample(h, "fwgw_redis_refused_writes_total", data="responses") == 1
        await until(lambda: sample(h, "fwgw_redis_refused_writes_total", data="usage") > 0)
        assert h.gateway.ledger.backlog().records == 1  # the record waits, not lost
        assert "Redis is full (maxmemory)" in caplog.text

        # The registry and the limits (the state instance) answer meanwhile: the request's
        # reservation was settled to what it used, an admin change lands and is enforced.
        generated = limit_keys("fwgw:", "fireworks")[2]
        assert sum(int(v) for v in state.client().hvals(generated)) == 152 * 2
        limits = {"requests_per_minute": 153, "generated_tokens_per_minute": 100_000}
        changed = await client.put("/admin/v1/accounts/fireworks/limits",
                                   headers=auth(ADMIN), json=limits)
        assert changed.status_code == 200, changed.text
        key = await client.post("/admin/v1/accounts/fireworks/api-keys", headers=auth(ADMIN))
        assert key.status_code == 200, key.text
        await asyncio.sleep(0.5)  # past the registry's poll interval
        assert (await respond(client, "new key", key=key.json()["api_key"])).status_code == 200
        assert (await respond(client, "past the limit")).status_code == 429  # 153 this minute

        # 3. Room again (the operator raised maxmemory): every record is in, each once.
        bound(bulk, 10_000_000)
        await until(lambda: h.gateway.ledger.backlog().records == 0)
        filler.close()
    records = await _records(bulk)
    assert len(records) == 153 and len({r.record_id for r in records}) == 153
    # A restart replays its append-only file within the bound it was written under.
    client = bulk.client()
    client.delete("filler")
    used = int(client.info("memory")["used_memory"])
    client.close()
    bulk.stop()
    bulk.start()
    client = bulk.client()
    assert int(client.info("memory")["used_memory"]) < 2 * used
    client.close()
    assert [r.record_id for r in await _records(bulk)] == [r.record_id for r in records]


async def _records(server: RedisServer) -> list[Any]:
    import redis.asyncio as aioredis

    client = aioredis.from_url(server.url)
    try:
        return await read_records(client, "fwgw:usage")
    finally:
        await client.aclose()

