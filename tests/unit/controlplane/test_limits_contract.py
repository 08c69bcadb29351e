"""One contract, two limiters: the same limit cases against the in-process limiter and the
Redis one (a real redis-server), each ended through its ledger as the gateway ends requests."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import redis.asyncio as aioredis

from gateway.controlplane.limits import Admission, Limiter, LocalLimiter
from gateway.controlplane.redis_ledger import RedisLedger
from gateway.controlplane.redis_limits import RedisLimiter
from gateway.controlplane.registry import Account, Limits
from gateway.controlplane.usage import Ledger, LocalLedger, UsageRecord
from gateway.errors import GatewayError
from tests.redis_server import RedisServer

pytestmark = pytest.mark.asyncio(loop_scope="session")


@dataclass
class Pair:
    limiter: Limiter
    ledger: Ledger

    async def end(self, admission: Admission, prompt: int, completion: int,
                  cached: int = 0) -> None:
        self.ledger.finish(UsageRecord(
            record_id=admission.record_id, request_id="q", account=admission.account,
            deployment="d", model="m", endpoint="/v1/completions", status="ok",
            http_status=200, prompt_tokens=prompt, cached_tokens=cached,
            completion_tokens=completion, time=time.time()), admission)
        if isinstance(self.ledger, RedisLedger):  # records and ends reach Redis in the
            assert isinstance(self.limiter, RedisLimiter)  # background
            for _ in range(200):
                if not self.ledger.pending and not self.limiter.ended:
                    return
                await asyncio.sleep(0.01)
            raise AssertionError("the ledger did not drain")


@pytest.fixture(params=["local", "redis"])
async def pair(request: pytest.FixtureRequest,
               redis_server: RedisServer) -> AsyncIterator[Pair]:
    if request.param == "local":
        local = LocalLimiter()
        yield Pair(local, LocalLedger(local))
        return
    client = aioredis.from_url(redis_server.url)
    prefix = f"c{uuid.uuid4().hex[:8]}:"
    limiter = RedisLimiter(client, prefix)
    ledger = RedisLedger(client, prefix, limiter=limiter)
    await limiter.start()
    await ledger.start()
    yield Pair(limiter, ledger)
    await ledger.stop()
    await limiter.stop()
    await client.aclose()


async def admit(pair: Pair, account: Account, prompt: int, generated: int,
                record_id: str) -> Admission | GatewayError:
    try:
        return await pair.limiter.admit(account, prompt, generated, record_id)
    except GatewayError as exc:
        return exc


async def test_requests_per_minute(pair: Pair) -> None:
    account = Account(id="acme", limits=Limits(requests_per_minute=3))
    results = [await admit(pair, account, 1, 1, f"r{n}") for n in range(5)]
    assert [isinstance(r, Admission) for r in results] == [True, True, True, False, False]
    refused = results[3]
    assert isinstance(refused, GatewayError) and refused.status == 429
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert int(refused.headers["retry-after"]) >= 1


async def test_concurrent_requests_free_at_the_end(pair: Pair) -> None:
    account = Account(id="acme", limits=Limits(concurrent_requests=2))
    first = await admit(pair, account, 1, 1, "a")
    assert isinstance(first, Admission)
    assert isinstance(await admit(pair, account, 1, 1, "b"), Admission)
    busy = await admit(pair, account, 1, 1, "c")
    assert isinstance(busy, GatewayError) and "concurrent" in busy.message
    await pair.end(first, 1, 1)
    assert isinstance(await admit(pair, account, 1, 1, "c"), Admission)


async def test_generated_tokens_reserve_then_settle(pair: Pair) -> None:
    account = Account(id="acme", limits=Limits(generated_tokens_per_minute=100))
    first = await admit(pair, account, 5, 60, "a")
    assert isinstance(first, Admission)
    assert isinstance(await admit(pair, account, 5, 30, "b"), Admission)
    spent = await admit(pair, account, 5, 20, "c")  # 90 reserved + 20 > 100
    assert isinstance(spent, GatewayError) and "generated tokens" in spent.message
    await pair.end(first, 7, 10)  # used 10 of the 60 reserved: 40 in the window
    assert isinstance(await admit(pair, account, 5, 60, "c"), Admission)  # 40 + 60 fits


async def test_one_request_larger_than_the_budget_passes_an_empty_window(pair: Pair) -> None:
    account = Account(id="acme", limits=Limits(prompt_tokens_per_minute=10))
    assert isinstance(await admit(pair, account, 500, 1, "a"), Admission)
    assert isinstance(await admit(pair, account, 1, 1, "b"), GatewayError)


async def test_accounts_do_not_share_limits(pair: Pair) -> None:
    one = Account(id="one", limits=Limits(requests_per_minute=1))
    two = Account(id="two", limits=Limits(requests_per_minute=1))
    assert isinstance(await admit(pair, one, 1, 1, "a"), Admission)
    assert isinstance(await admit(pair, two, 1, 1, "b"), Admission)
    assert isinstance(await admit(pair, one, 1, 1, "c"), GatewayError)
