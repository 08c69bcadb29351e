"""The Redis backends against a real redis-server: registry store, limits, usage ledger."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.controlplane.limits import Admission
from gateway.controlplane.redis_ledger import RedisLedger, read_records
from gateway.controlplane.redis_limits import RedisLimiter, limit_keys
from gateway.controlplane.registry import (
    Account,
    Deployment,
    Limits,
    RegistryData,
    Replica,
    hash_key,
)
from gateway.controlplane.store import RedisStore, merge_seed
from gateway.controlplane.usage import UsageRecord, totals_of
from gateway.errors import GatewayError
from tests.redis_server import RedisServer
from tests.unit.harness import build

pytestmark = pytest.mark.asyncio(loop_scope="session")  # the loop the client fixture uses

SEED = RegistryData(accounts=[Account(id="fireworks")], deployments=[
    Deployment(id="d1", account="fireworks", model="accounts/fireworks/models/m",
               default=True, replicas=[Replica(url="http://w1")])])


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:8]}:"


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    # A timeout as the gateway's own client has: a stuck command fails the test, never
    # stalls the run.
    client = aioredis.from_url(redis_server.url, socket_timeout=10)
    yield client
    await client.aclose()


def dead_client() -> aioredis.Redis:
    from tests.conftest import free_port

    return aioredis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.2)


def add_deployment(data: RegistryData) -> RegistryData:
    data.deployments.append(Deployment(id="d2", account="fireworks",
                                       model="accounts/fireworks/models/m2",
                                       replicas=[Replica(url="http://w2")]))
    return data


async def test_a_change_reaches_every_store_within_the_poll_interval(
        client: aioredis.Redis, redis_server: RedisServer, prefix: str) -> None:
    other_client = aioredis.from_url(redis_server.url)
    first = RedisStore(client, SEED, prefix=prefix, poll_interval=0.05)
    second = RedisStore(other_client, SEED, prefix=prefix, poll_interval=0.05)
    await first.start()
    await second.start()
    try:
        assert await client.get(f"{prefix}registry:version") == b"1"  # seeded once
        await first.change(add_deployment)
        started = time.monotonic()
        while len(second.current.data.deployments) < 2:
            assert time.monotonic() - started < 1.0
            await asyncio.sleep(0.01)
    finally:
        await first.stop()
        await second.stop()
        await other_client.aclose()


async def test_a_changed_seed_file_is_merged_once_keeping_admin_changes(
        client: aioredis.Redis, prefix: str) -> None:
    store = RedisStore(client, SEED, prefix=prefix)
    await store.start()
    await store.stop()
    await store.change(add_deployment)  # through the admin API
    declared = SEED.model_copy(deep=True)
    declared.deployments[0].context_length = 4096  # the chart's values changed
    declared.accounts.append(Account(id="new", api_keys=["sha256:" + "0" * 64]))
    upgraded = RedisStore(client, declared, prefix=prefix)
    await upgraded.start()
    await upgraded.stop()
    data = upgraded.current.data
    assert {d.id: d.context_length for d in data.deployments} == {"d1": 4096, "d2": None}
    assert "new" in {a.id for a in data.accounts}
    version = await client.get(f"{prefix}registry:version")
    again = RedisStore(client, declared, prefix=prefix)  # same file: nothing to merge
    await again.start()
    await again.stop()
    assert await client.get(f"{prefix}registry:version") == version


async def test_a_key_removed_from_the_seed_is_revoked_on_every_gateway(
        client: aioredis.Redis, prefix: str) -> None:
    """Keys K1 and K2 in the seed; the rollout's seed has K2 only: K1 is refused on the
    gateway that restarted and on one that kept running, while a key added through the
    admin API stays until deleted there."""
    k1, k2, k3 = (hash_key(name) for name in ("K1", "K2", "K3"))
    with_both = RegistryData(accounts=[Account(id="acme", api_keys=[k1, k2])])
    running = RedisStore(client, with_both, prefix=prefix, poll_interval=0.05)
    await running.start()
    assert running.current.authenticate("K1").id == "acme"

    def add_k3(data: RegistryData) -> RegistryData:  # through the admin API
        data.accounts[0].api_keys.append(k3)
        return data

    await running.change(add_k3)
    rolled = RedisStore(client, RegistryData(accounts=[Account(id="acme", api_keys=[k2])]),
                        prefix=prefix)
    await rolled.start()
    await rolled.stop()
    await asyncio.sleep(0.3)  # the running gateway's poll
    for store in (rolled, running):
        with pytest.raises(GatewayError) as refused:
            store.current.authenticate("K1")
        assert refused.value.status == 401
        assert store.current.authenticate("K2").id == "acme"
        assert store.current.authenticate("K3").id == "acme"  # the admin API's stays
    await running.stop()


async def test_concurrent_changes_are_not_lost(client: aioredis.Redis, prefix: str) -> None:
    stores = [RedisStore(client, SEED, prefix=prefix) for _ in range(3)]
    for store in stores:
        await store.refresh()

    def adder(n: int):  # type: ignore[no-untyped-def]
        def change(data: RegistryData) -> RegistryData:
            data.deployments.append(Deployment(id=f"n{n}", account="a", model="m"))
            return data
        return change

    await asyncio.gather(*(stores[n % 3].change(adder(n)) for n in range(12)))
    await stores[0].refresh()
    assert {d.id for d in stores[0].current.data.deployments} >= {f"n{n}" for n in range(12)}


async def test_serves_last_good_copy_and_restores_an_emptied_redis(
        client: aioredis.Redis, prefix: str) -> None:
    store = RedisStore(client, SEED, prefix=prefix)
    await store.refresh()
    await store.change(add_deployment)
    store.redis = dead_client()  # Redis unreachable
    with pytest.raises(RedisError):
        await store.refresh()
    assert len(store.current.data.deployments) == 2  # still the last good copy
    await store.redis.aclose()
    store.redis = client
    await client.delete(f"{prefix}registry", f"{prefix}registry:version")  # lost its data
    await store.refresh()
    assert len(RegistryData.model_validate_json(
        await client.get(f"{prefix}registry")).deployments) == 2


async def test_limit_admits_exactly_l_across_limiters(
        client: aioredis.Redis, redis_server: RedisServer, prefix: str) -> None:
    other_client = aioredis.from_url(redis_server.url)
    limiters = [RedisLimiter(client, prefix), RedisLimiter(other_client, prefix)]
    account = Account(id="acme", limits=Limits(requests_per_minute=7))

    async def one(n: int) -> Admission | GatewayError:
        try:
            return await limiters[n % 2].admit(account, 10, 10, f"r{n}")
        except GatewayError as exc:
            return exc

    results = await asyncio.gather(*(one(n) for n in range(21)))
    await other_client.aclose()
    admitted = [r for r in results if isinstance(r, Admission)]
    refused = [r for r in results if isinstance(r, GatewayError)]
    assert len(admitted) == 7 and len(refused) == 14
    assert all(r.status == 429 and int(r.headers["retry-after"]) >= 1 for r in refused)
    assert refused[0].headers["x-ratelimit-limit-requests"] == "7"
    assert refused[0].headers["x-ratelimit-remaining-requests"] == "0"
    assert sorted(int(a.headers["x-ratelimit-remaining-requests"]) for a in admitted) == \
        list(range(7))


def record(record_id: str, account: str, prompt: int, completion: int) -> UsageRecord:
    return UsageRecord(record_id=record_id, request_id="q", account=account, deployment="d",
                       model="m", endpoint="/v1/completions", status="ok", http_status=200,
                       prompt_tokens=prompt, completion_tokens=completion, time=time.time())


async def wait_empty(ledger: RedisLedger) -> None:
    for _ in range(200):
        if not ledger.pending:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("ledger did not drain")


async def test_tokens_reserve_then_settle_and_concurrency_frees(
        client: aioredis.Redis, prefix: str) -> None:
    limiter = RedisLimiter(client, prefix)
    ledger = RedisLedger(client, prefix, limiter=limiter)
    await limiter.start()
    await ledger.start()
    account = Account(id="acme", limits=Limits(generated_tokens_per_minute=100,
                                               concurrent_requests=2))
    first = await limiter.admit(account, 5, 60, "a")
    second = await limiter.admit(account, 5, 30, "b")
    with pytest.raises(GatewayError) as busy:
        await limiter.admit(account, 5, 1, "c")  # two running
    assert "concurrent" in busy.value.message
    ledger.finish(record("a", "acme", 7, 10), first)  # used 10 of the 60 reserved
    await wait_empty(ledger)
    generated = limit_keys(prefix, "acme")[2]
    assert sum(int(v) for v in (await client.hvals(generated))) == 40
    third = await limiter.admit(account, 5, 60, "c")  # 40 + 60 fits after settling
    assert third.headers["x-ratelimit-remaining-tokens-generated"] == "0"
    with pytest.raises(GatewayError) as spent:
        await limiter.admit(account, 5, 1, "d")
    assert "concurrent" in spent.value.message  # still two running: b and c
    ledger.finish(record("b", "acme", 1, 1), second)
    await wait_empty(ledger)
    with pytest.raises(GatewayError) as tokens:
        await limiter.admit(account, 5, 60, "e")
    assert "generated tokens" in tokens.value.message
    await ledger.stop()


async def test_each_record_is_appended_once_even_when_sent_again(
        client: aioredis.Redis, prefix: str) -> None:
    ledger = RedisLedger(client, prefix)
    await ledger.start()
    for n in range(5):
        ledger.finish(record(f"r{n}", "acme", n, 2 * n), Admission(f"r{n}", "acme"))
    ledger.finish(record("r3", "acme", 3, 6), Admission("r3", "acme"))  # a retried append
    await wait_empty(ledger)
    records = await read_records(client, f"{prefix}usage")
    assert sorted(r.record_id for r in records) == [f"r{n}" for n in range(5)]
    assert sum(r.completion_tokens for r in records) == 20
    # The totals are kept as records are appended (once each), not summed from the stream.
    totals = await ledger.totals()
    assert totals == totals_of(records)
    assert totals["acme"].requests == 5 and totals["acme"].by_status == {"ok": 5}
    await ledger.stop()


async def test_what_usage_keeps_in_redis_is_bounded_by_settings(
        client: aioredis.Redis, prefix: str) -> None:
    """The stream keeps about max_length records (Redis trims whole nodes of 100 at most),
    and each record's id (exactly once) is kept marker_ttl seconds."""
    ledger = RedisLedger(client, prefix, max_length=10, marker_ttl=1)
    await ledger.start()
    for n in range(1000):
        ledger.finish(record(f"r{n}", "acme", 1, 1), Admission(f"r{n}", "acme"))
    await wait_empty(ledger)
    assert 10 <= await client.xlen(f"{prefix}usage") <= 10 + 100
    assert await client.zcard(f"{prefix}usage:written") == 1000
    await asyncio.sleep(1.1)
    ledger.finish(record("last", "acme", 1, 1), Admission("last", "acme"))
    await wait_empty(ledger)
    assert await client.zrange(f"{prefix}usage:written", 0, -1) == [b"last"]
    assert (await ledger.totals())["acme"].requests == 1001  # the totals count them all
    await ledger.stop()


async def test_records_wait_while_redis_is_unreachable(client: aioredis.Redis,
                                                       prefix: str) -> None:
    ledger = RedisLedger(dead_client(), prefix, max_pending=3)
    await ledger.start()
    for n in range(5):  # past max_pending: refused admissions, never dropped records
        assert ledger.backlogged == (n >= 3)
        ledger.finish(record(f"x{n}", "acme", 1, 1), Admission(f"x{n}", "acme"))
    await asyncio.sleep(0.3)
    assert ledger.pending == 5 and ledger.backlogged
    await ledger.records.client.aclose()
    ledger.records.client = client
    ledger._record = client.register_script(ledger._record.script)
    ledger.records.wake.set()
    await wait_empty(ledger)
    assert [r.record_id for r in await read_records(client, f"{prefix}usage")] == \
        [f"x{n}" for n in range(5)]
    assert not ledger.backlogged
    await ledger.stop()


async def test_a_running_request_keeps_its_concurrency_slot(client: aioredis.Redis,
                                                            prefix: str) -> None:
    limiter = RedisLimiter(client, prefix, slot_lifetime=0.6)
    await limiter.start()  # refreshes every 0.2 s
    account = Account(id="acme", limits=Limits(concurrent_requests=1))
    running = await limiter.admit(account, 1, 1, "long")
    await asyncio.sleep(1.2)  # twice the lifetime
    with pytest.raises(GatewayError) as busy:
        await limiter.admit(account, 1, 1, "next")
    assert busy.value.status == 429
    assert running.record_id in limiter.held
    await limiter.stop()  # this gateway dies holding it: nobody refreshes or frees it
    await asyncio.sleep(0.7)
    await limiter.admit(account, 1, 1, "next")  # expired


async def test_an_ended_request_frees_its_slot_without_its_usage_record(
        client: aioredis.Redis, prefix: str) -> None:
    """The record may wait in a backlog (after an outage); the slot must not."""
    limiter = RedisLimiter(client, prefix)
    await limiter.start()
    account = Account(id="acme", limits=Limits(concurrent_requests=2))
    first = await limiter.admit(account, 1, 1, "one")
    await limiter.admit(account, 1, 1, "two")
    with pytest.raises(GatewayError):
        await limiter.admit(account, 1, 1, "three")
    limiter.settle(first, 1, 1)  # no ledger at all here
    for _ in range(100):
        if not limiter.ended:
            break
        await asyncio.sleep(0.01)
    await limiter.admit(account, 1, 1, "three")
    # An account limited otherwise than in concurrency takes no slot (nothing would free it).
    rated = Account(id="rated", limits=Limits(requests_per_minute=100))
    limiter.settle(await limiter.admit(rated, 1, 1, "four"), 1, 1)
    assert await client.zcard(limit_keys(prefix, "rated")[3]) == 0
    await limiter.stop()


async def test_a_slot_admitted_without_an_answer_is_freed_when_redis_is_back(
        client: aioredis.Redis, prefix: str) -> None:
    """An admission whose answer was lost (the connection broke after the script ran) may
    hold a slot: it is freed at the request's end like any other, once Redis answers."""
    account = Account(id="acme", limits=Limits(concurrent_requests=1))
    taken = await RedisLimiter(client, prefix).admit(account, 1, 1, "lost")  # landed...
    limiter = RedisLimiter(dead_client(), prefix)  # ...but this gateway never heard back
    admission = await limiter.admit(account, 1, 1, "lost")
    assert admission.bucket is None and limiter.held == {"lost": "acme"}
    await limiter.start()
    limiter.settle(admission, 1, 1)
    await asyncio.sleep(0.3)
    assert limiter.ended == [("acme", "lost")]  # Redis away: kept for later
    with pytest.raises(GatewayError):
        await RedisLimiter(client, prefix).admit(account, 1, 1, "next")
    limiter.client = client  # Redis back
    for _ in range(100):
        if not limiter.ended:
            break
        await asyncio.sleep(0.02)
    await RedisLimiter(client, prefix).admit(account, 1, 1, "next")
    await limiter.stop()
    assert taken.bucket is not None


async def test_an_outage_is_logged_every_ten_seconds_not_per_request(
        prefix: str, caplog: pytest.LogCaptureFixture) -> None:
    limiter = RedisLimiter(dead_client(), prefix)
    account = Account(id="acme", limits=Limits(requests_per_minute=10))
    with caplog.at_level(logging.WARNING, logger="gateway.limits"):
        for n in range(50):  # thousands a second under load: one line, not thousands
            await limiter.admit(account, 1, 1, f"r{n}")
    warnings = [r for r in caplog.records if "not enforced" in r.getMessage()]
    assert len(warnings) == 1 and "1 requests admitted" in warnings[0].getMessage()
    limiter._next_warning = 0.0  # ten seconds later
    with caplog.at_level(logging.WARNING, logger="gateway.limits"):
        await limiter.admit(account, 1, 1, "late")
    assert "50 requests admitted" in caplog.records[-1].getMessage()


async def test_huge_reservations_do_not_open_the_limits(client: aioredis.Redis,
                                                        prefix: str) -> None:
    limiter = RedisLimiter(client, prefix)
    account = Account(id="acme", limits=Limits(concurrent_requests=2))
    for n in range(2):
        await limiter.admit(account, 10**17, 10**17 * 128, f"r{n}")
    with pytest.raises(GatewayError) as refused:
        await limiter.admit(account, 10**17, 10**17, "r3")
    assert refused.value.status == 429


async def test_a_failing_check_refuses_and_only_an_unreachable_redis_admits(
        client: aioredis.Redis, redis_server: RedisServer, prefix: str) -> None:
    seen: list[tuple[str, str]] = []
    account = Account(id="acme", limits=Limits(concurrent_requests=1))

    def degraded(reason: str, outcome: str) -> None:
        seen.append((reason, outcome))

    # A script error (here the window key holds the wrong type): refused, not admitted.
    await client.set(limit_keys(prefix, "acme")[0], "not a hash")
    with pytest.raises(GatewayError) as refused:
        await RedisLimiter(client, prefix, degraded=degraded).admit(account, 1, 1, "r1")
    assert refused.value.status == 503 and seen == [("error", "refused")]
    await client.delete(limit_keys(prefix, "acme")[0])

    # Redis too slow to answer, twice: refused.
    slow = aioredis.from_url(redis_server.url, socket_timeout=0.2)
    await slow.ping()
    await client.execute_command("CLIENT", "PAUSE", "1000", "WRITE")
    with pytest.raises(GatewayError) as refused:
        await RedisLimiter(slow, prefix, degraded=degraded).admit(account, 1, 1, "r2")
    assert refused.value.status == 503 and seen[-1] == ("timeout", "refused")
    await client.execute_command("CLIENT", "UNPAUSE")
    await slow.aclose()

    # Redis unreachable: admitted without limits, and said so.
    dead = dead_client()
    admission = await RedisLimiter(dead, prefix, degraded=degraded).admit(account, 1, 1, "r3")
    assert admission.bucket is None and seen[-1] == ("unreachable", "admitted")
    await dead.aclose()


async def test_a_stored_registry_that_does_not_validate_never_stops_a_gateway(
        client: aioredis.Redis, redis_server: RedisServer, prefix: str) -> None:
    running = RedisStore(client, SEED, prefix=prefix, poll_interval=0.05)
    await running.start()
    await running.change(add_deployment)
    # What an older gateway, a hand edit or a bug could leave: NaN, a URL nobody can use.
    bad = orjson.loads(await client.get(f"{prefix}registry"))
    bad["deployments"][0]["generation_config"] = {"temperature": "NaN"}
    bad["deployments"][1]["replicas"] = [{"url": "http://[::1"}]
    await client.set(f"{prefix}registry", orjson.dumps(bad))
    await client.incr(f"{prefix}registry:version")
    try:
        await asyncio.sleep(0.2)
        assert running.problem is not None  # noticed, reported ...
        assert len(running.current.data.deployments) == 2  # ... and the last good copy served
        # A gateway starting now (its own connections, as another process has) starts, on
        # its seed.
        other_client = aioredis.from_url(redis_server.url, socket_timeout=10)
        starting = RedisStore(other_client, SEED, prefix=prefix)
        await starting.start()
        assert starting.problem is not None and len(starting.current.data.deployments) == 1
        await starting.stop()
        await other_client.aclose()
        # The next valid change starts from the good copy and repairs Redis for everyone.
        await running.change(lambda data: data)
        assert running.problem is None
        RegistryData.model_validate_json(await client.get(f"{prefix}registry"))
    finally:
        await running.stop()



async def test_a_gateway_authenticates_to_a_redis_that_requires_a_password(
        tmp_path: Path) -> None:
    """GATEWAY_REDIS_PASSWORD_FILE: the gateway AUTHs to a Redis that refuses anyone else
    (a real redis-server with requirepass)."""
    server = RedisServer()
    server.start()
    try:
        admin = server.client()
        admin.config_set("requirepass", "r3dis-pass")
        admin.close()
        (tmp_path / "password").write_text("r3dis-pass\n")
        h = build(tmp_path, redis_url=server.url, redis_password_file=tmp_path / "password")
        async with h.running():
            pass  # the gateway wrote its registry to Redis at start
        authed = aioredis.from_url(server.url, password="r3dis-pass")
        assert await authed.get("fwgw:registry:version") is not None
        await authed.aclose()
        anonymous = aioredis.from_url(server.url)
        with pytest.raises(RedisError):
            await anonymous.get("fwgw:registry:version")
        await anonymous.aclose()
    finally:
        server.stop()


async def test_a_seeds_routers_and_budgets_win_and_admin_ones_stay() -> None:
    def router(name: str, weight: int) -> dict[str, object]:
        return {"id": name, "account": "acme", "model": "m",
                "deployments": [{"deployment": "d", "weight": weight}]}

    budget = {"name": "daily", "window": "day", "tokens": 10}
    stored = RegistryData.model_validate({
        "accounts": [{"id": "acme", "budgets": [budget | {"tokens": 99}]}, {"id": "kept",
                     "budgets": [budget]}],
        "routers": [router("seeded", 1), router("admin-made", 1)]})
    seed = RegistryData.model_validate({
        "accounts": [{"id": "acme", "budgets": [budget]}, {"id": "kept"}],
        "routers": [router("seeded", 5)]})
    merged = merge_seed(stored, seed)
    assert {(r.id, r.deployments[0].weight) for r in merged.routers} == {
        ("seeded", 5), ("admin-made", 1)}
    budgets = {a.id: [b.tokens for b in a.budgets] for a in merged.accounts}
    assert budgets == {"acme": [10], "kept": [10]}  # a seed without budgets changes none
