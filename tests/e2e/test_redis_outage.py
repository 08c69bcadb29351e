"""Limits and usage across a Redis outage under load: two gateway processes sharing one real
redis-server (append-only file on), in front of a fast fake worker (bench/fake_upstream.py:
the load is the point here, not the model), 16 clients in a closed loop. Redis is killed
(SIGKILL) while they run and started again on its files.

What must hold: an account with a concurrency limit far above what it has in flight is never
refused after Redis is back (the slots of its finished requests are freed before the backlog
of records from the outage is written); every answered request has exactly one usage record
once the gateways have drained, and how many records wait is visible meanwhile."""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest
import redis.asyncio as aioredis
import yaml

from bench.raw_client import Connection, completion
from gateway.controlplane.redis_ledger import read_records
from gateway.controlplane.registry import hash_key
from gateway.controlplane.usage import UsageRecord
from gateway.local_stack import Child, wait_healthy
from tests.conftest import free_port
from tests.e2e.processes import _child, log_tails, start_gateway
from tests.redis_server import RedisServer

pytestmark = pytest.mark.e2e
ADMIN = "fw_outage_admin"
KEYS = {"alpha": "fw_outage_alpha", "limited": "fw_outage_limited"}
MODEL = "accounts/fireworks/models/fake"
LIMIT = 40  # concurrent requests for `limited`, which never has more than 8 in flight
CLIENTS = 16


@dataclass
class Stack:
    redis: RedisServer
    gateways: list[int]
    children: list[Child] = field(default_factory=list)

    def pending(self) -> list[dict[str, float]]:
        return [httpx.get(f"http://127.0.0.1:{port}/admin/v1/usage", timeout=10,
                          headers={"Authorization": f"Bearer {ADMIN}"}).json()["pending"]
                for port in self.gateways]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    redis = RedisServer()
    redis.start()
    fake = free_port()
    upstream = _child(f"worker-{fake}", [sys.executable, "-m", "bench.fake_upstream",
                                         str(fake)])
    wait_healthy(upstream, f"http://127.0.0.1:{fake}/health", "starting the fake worker", 30)
    registry = tmp_path_factory.mktemp("outage") / "registry.yaml"
    registry.write_text(yaml.safe_dump({
        "accounts": [
            {"id": "fireworks"},
            {"id": "alpha", "api_keys": [hash_key(KEYS["alpha"])]},
            {"id": "limited", "api_keys": [hash_key(KEYS["limited"])],
             "limits": {"concurrent_requests": LIMIT, "requests_per_minute": 1_000_000,
                        "prompt_tokens_per_minute": 100_000_000,
                        "generated_tokens_per_minute": 100_000_000}}],
        "deployments": [{"id": "fake", "account": "fireworks", "model": MODEL,
                         "default": True, "replicas": [{"url": f"http://127.0.0.1:{fake}"}]}]}))
    ports = [free_port(), free_port()]
    children = [upstream] + [
        start_gateway(registry, port, redis_url=redis.url, admin_key=ADMIN,
                      log_level="warning") for port in ports]
    yield Stack(redis, ports, children)
    for child in children:
        child.stop()
    redis.stop()


@dataclass
class Load:
    """Closed-loop clients on kept-alive connections (bench/raw_client.py: httpx would be
    the slowest process here). Half the clients are `alpha`'s, half `limited`'s; every other
    request streams."""

    gateways: list[int]
    phase: str = "before"
    running: bool = True
    statuses: dict[str, int] = field(default_factory=dict)  # request id -> status
    counts: collections.Counter[tuple[str, str, int]] = field(
        default_factory=collections.Counter)  # (phase, account, status) -> answers

    async def client(self, number: int) -> None:
        account = "alpha" if number % 2 == 0 else "limited"
        connection = Connection(self.gateways[number // 2 % len(self.gateways)])
        sent = 0
        while self.running:
            request_id = f"c{number}-{sent}"
            status = await connection.send(completion(KEYS[account], MODEL, sent % 2 == 1,
                                                      request_id))
            sent += 1
            self.statuses[request_id] = status
            self.counts[(self.phase, account, status)] += 1
        connection.close()

    def answered(self, phase: str) -> int:
        return sum(n for (p, _, _), n in self.counts.items() if p == phase)


def usage_records(redis: RedisServer) -> list[UsageRecord]:
    """The usage stream, read as the gateway's own reader reads it."""
    async def read() -> list[UsageRecord]:
        client = aioredis.from_url(redis.url)
        try:
            return await read_records(client, "fwgw:usage")
        finally:
            await client.aclose()
    return asyncio.run(read())


def backlog_metric(port: int) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10,
                     headers={"Authorization": f"Bearer {ADMIN}"}).text
    for line in text.splitlines():
        if line.startswith("fwgw_usage_records_pending"):
            return float(line.split()[-1])
    raise AssertionError("no fwgw_usage_records_pending in /metrics")


async def outage(stack: Stack, load: Load) -> dict[str, float]:
    """Load before, during and after a Redis outage; the seconds each took."""
    clients = [asyncio.create_task(load.client(n)) for n in range(CLIENTS)]
    loop = asyncio.get_running_loop()
    seconds: dict[str, float] = {}
    started = time.monotonic()
    await asyncio.sleep(2)
    assert stack.redis.child is not None
    os.kill(stack.redis.child.process.pid, signal.SIGKILL)
    stack.redis.child.process.wait()
    load.phase = "outage"
    seconds["before"] = time.monotonic() - started
    started = time.monotonic()
    await asyncio.sleep(3)
    waiting = await loop.run_in_executor(None, backlog_metric, stack.gateways[0])
    seconds["backlog during the outage"] = waiting
    await loop.run_in_executor(None, stack.redis.start)  # the same files: AOF replayed
    load.phase = "after"
    seconds["outage"] = time.monotonic() - started
    started = time.monotonic()
    while time.monotonic() - started < 4:
        pending = await loop.run_in_executor(None, stack.pending)
        if "caught up" not in seconds and all(p["oldest_seconds"] < 0.5 for p in pending):
            seconds["caught up"] = time.monotonic() - started  # the backlog written
        await asyncio.sleep(0.2)
    load.running = False
    await asyncio.wait_for(asyncio.gather(*clients), 30)
    seconds["after"] = time.monotonic() - started
    return seconds


def test_limits_and_usage_hold_across_a_redis_kill_under_load(stack: Stack) -> None:
    load = Load(stack.gateways)
    seconds = asyncio.run(outage(stack, load))
    stopped = time.monotonic()
    while not all(p["records"] == 0 for p in stack.pending()):
        assert time.monotonic() - stopped < 30, "usage records still waiting after 30 s"
        time.sleep(0.1)
    drained = time.monotonic() - stopped
    rates = {phase: load.answered(phase) / seconds[phase]
             for phase in ("before", "outage", "after")}
    print(f"answers/s: {rates}; records waiting during the outage "
          f"(gateway 0): {seconds['backlog during the outage']:.0f}; caught up under load "
          f"{seconds.get('caught up', -1):.1f} s after Redis came back, drained "
          f"{drained:.1f} s after the load stopped; answers by (phase, account, status): "
          f"{dict(load.counts)}")
    context = log_tails(*(f"http://127.0.0.1:{p}" for p in stack.gateways))
    assert load.answered("outage") >= 300, f"too little load during the outage\n{context}"
    assert seconds["backlog during the outage"] > 0
    assert "caught up" in seconds, f"the backlog was not written under load\n{context}"
    refused = {key: n for key, n in load.counts.items() if key[2] != 200}
    assert not refused, f"refused or failed answers: {refused}\n{context}"

    # Exactly one usage record per answered request, none for anything else.
    records = usage_records(stack.redis)
    recorded = collections.Counter(r.request_id for r in records)
    answered = {rid for rid, status in load.statuses.items() if status == 200}
    missing = answered - set(recorded)
    duplicated = {rid: n for rid, n in recorded.items() if n > 1}
    unknown = set(recorded) - set(load.statuses)
    print(f"{len(answered)} answers, {len(records)} usage records: {len(missing)} missing, "
          f"{len(duplicated)} duplicated, {len(unknown)} for no answer")
    assert not missing and not duplicated and not unknown
    assert all(r.status == "ok" and r.http_status == 200 for r in records)
    assert backlog_metric(stack.gateways[0]) == 0
