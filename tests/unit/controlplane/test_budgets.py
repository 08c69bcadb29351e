"""Token budgets: the arithmetic and the windows (tables; the Lua windows against Python's
on a real redis-server), then one contract for both limiters (reserve, refuse, settle,
shadow), exactness across gateways sharing Redis, and a Redis outage."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from datetime import UTC, datetime

import pytest
import redis.asyncio as aioredis

from gateway.controlplane import redis_limits
from gateway.controlplane.budgets import WINDOW_LUA, Budget, Hold, budget_key, window
from gateway.controlplane.limits import Admission, BudgetSpent
from gateway.controlplane.redis_ledger import RedisLedger
from gateway.controlplane.redis_limits import RedisLimiter
from gateway.controlplane.registry import Account
from gateway.errors import GatewayError
from tests.redis_server import RedisServer
from tests.unit.controlplane.test_limits_contract import Pair, admit, pair

__all__ = ["pair"]  # the contract's fixture: both limiters
session = pytest.mark.asyncio(loop_scope="session")


def at(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp())


@pytest.mark.parametrize(("weights", "prompt", "cached", "completion", "cost", "reserve"), [
    ((1, 1, 1), 100, 0, 50, 150, 150),  # everything, alike
    ((1, 0.5, 1), 100, 40, 50, 60 + 20 + 50, 150),  # cached at half; reserved as uncached
    ((1, 1, 0), 100, 40, 50, 100, 100),  # input only
    ((0, 0, 1), 100, 40, 50, 50, 50),  # output only
    ((1, 0.5, 4), 3, 1, 1, 7, 7),  # 2 + 0.5 + 4 = 6.5, rounded up
    ((0.25, 0.1, 1), 10, 20, 0, 1, 3),  # cached past the prompt counts as the prompt
    ((1.1, 1, 0), 100, 0, 0, 110, 110),  # 110.00000000000001 in floats: not 111
    ((1000, 1, 0), 2_000_000, 0, 0, 2_000_000_000, 2_000_000_000),  # large: not one less
    ((1, 1, 0.7), 0, 0, 4_000_000_001, 2_800_000_001, 2_800_000_001),  # .7 up, not down
])
def test_cost_and_reservation(weights: tuple[float, float, float], prompt: int, cached: int,
                              completion: int, cost: int, reserve: int) -> None:
    budget = Budget(name="b", window="day", tokens=1000, input_weight=weights[0],
                    cached_weight=weights[1], output_weight=weights[2])
    assert budget.cost(prompt, cached, completion) == cost
    assert budget.reservation(prompt, completion) == reserve
    assert budget.cost(prompt, cached, completion) <= budget.reservation(prompt, completion)


WINDOWS = [
    ("2026-12-07T14:00:00", "day", "20261207", "2026-12-08T00:00:00"),
    ("2026-12-31T23:59:59", "day", "20261231", "2027-01-01T00:00:00"),
    ("2026-12-31T23:59:59", "month", "202612", "2027-01-01T00:00:00"),
    ("2027-01-01T00:00:00", "month", "202701", "2027-02-01T00:00:00"),
    ("2024-02-29T12:00:00", "day", "20240229", "2024-03-01T00:00:00"),
    ("2024-02-10T00:00:00", "month", "202402", "2024-03-01T00:00:00"),  # leap year
    ("2100-02-10T00:00:00", "month", "210002", "2100-03-01T00:00:00"),  # not a leap year
    ("2000-02-29T00:00:00", "month", "200002", "2000-03-01T00:00:00"),  # a leap year
    ("2026-11-30T23:59:59", "month", "202611", "2026-12-01T00:00:00"),
]


@pytest.mark.parametrize(("now", "kind", "window_id", "ends"), WINDOWS)
def test_windows_are_utc_days_and_months(now: str, kind: str, window_id: str,
                                         ends: str) -> None:
    assert window(kind, at(now)) == (window_id, at(ends))  # type: ignore[arg-type]


@session
async def test_the_lua_windows_are_pythons(redis_server: RedisServer) -> None:
    """Redis computes the windows on its own clock: the same days and months."""
    client = aioredis.from_url(redis_server.url)
    script = client.register_script(WINDOW_LUA + """
local out = {}
for i = 1, #ARGV, 2 do
  local id, ends = window(ARGV[i], tonumber(ARGV[i + 1]))
  out[#out + 1] = id
  out[#out + 1] = ends
end
return out""")
    rng = random.Random(38)
    cases = [(kind, at(now)) for now, kind, _, _ in WINDOWS]
    cases += [(rng.choice(["day", "month"]), rng.randrange(0, at("2200-01-01T00:00:00")))
              for _ in range(2000)]
    args = [value for case in cases for value in case]
    found = await script(keys=[], args=args)
    await client.aclose()
    lua = [(found[i].decode(), int(found[i + 1])) for i in range(0, len(found), 2)]
    assert lua == [window(kind, now) for kind, now in cases]  # type: ignore[arg-type]


def budgets(*made: Budget) -> Account:
    return Account(id=f"acct-{uuid.uuid4().hex[:6]}", budgets=list(made))


@session
async def test_a_budget_reserves_refuses_then_settles(pair: Pair) -> None:
    account = budgets(Budget(name="daily", window="day", tokens=100, input_weight=0,
                             cached_weight=0))
    first = await admit(pair, account, 10, 60, "a")
    assert isinstance(first, Admission) and first.holds[0].used == 60
    assert isinstance(await admit(pair, account, 10, 40, "b"), Admission)  # 100: full
    refused = await admit(pair, account, 10, 1, "c")
    assert isinstance(refused, BudgetSpent) and refused.status == 429
    assert "daily" in refused.message and "0 of 100" in refused.message
    _, ends = window("day", time.time())
    retry = int(refused.headers["retry-after"])
    assert abs(retry - (ends - time.time())) <= 2  # to the window's end
    await pair.end(first, 10, 15)  # used 15 of the 60 reserved
    assert isinstance(await admit(pair, account, 10, 45, "c"), Admission)  # 55 + 45
    assert isinstance(await admit(pair, account, 10, 1, "d"), GatewayError)
    (spent,) = await pair.limiter.spent(account.id, account.budgets)
    assert (spent.used, spent.refused, spent.shadow) == (100, 2, 0)


@session
async def test_cached_tokens_settle_at_their_weight(pair: Pair) -> None:
    account = budgets(Budget(name="weighted", window="month", tokens=1000,
                             cached_weight=0.5, output_weight=2))
    first = await admit(pair, account, 100, 10, "a")
    assert isinstance(first, Admission) and first.holds[0].used == 120
    await pair.end(first, 100, 10, cached=60)  # 40 + 30 + 20
    (spent,) = await pair.limiter.spent(account.id, account.budgets)
    assert spent.used == 90 and spent.window == window("month", time.time())[0]


@session
async def test_a_shadow_budget_refuses_nothing_and_counts_what_it_would(pair: Pair) -> None:
    account = budgets(Budget(name="watch", window="day", tokens=50, shadow=True),
                      Budget(name="real", window="month", tokens=1000))
    results = [await admit(pair, account, 0, 20, f"r{n}") for n in range(5)]
    assert all(isinstance(r, Admission) for r in results)
    watch, real = await pair.limiter.spent(account.id, account.budgets)
    assert (watch.used, watch.refused, watch.shadow) == (100, 0, 3)  # 60, 80, 100 > 50
    assert (real.used, real.shadow) == (100, 0)


@session
async def test_the_first_refusing_budget_answers_and_nothing_is_reserved(pair: Pair) -> None:
    account = budgets(Budget(name="big", window="month", tokens=1000),
                      Budget(name="small", window="day", tokens=10))
    refused = await admit(pair, account, 0, 20, "a")
    assert isinstance(refused, BudgetSpent) and refused.budget.name == "small"
    big, small = await pair.limiter.spent(account.id, account.budgets)
    assert (big.used, small.used, small.refused) == (0, 0, 1)


@session
async def test_accounts_do_not_share_budgets(pair: Pair) -> None:
    made = Budget(name="daily", window="day", tokens=10)
    one, two = budgets(made), budgets(made)
    assert isinstance(await admit(pair, one, 0, 10, "a"), Admission)
    assert isinstance(await admit(pair, two, 0, 10, "b"), Admission)
    assert isinstance(await admit(pair, one, 0, 1, "c"), BudgetSpent)


@session
async def test_two_gateways_admit_exactly_the_budget(redis_server: RedisServer) -> None:
    """Two limiters (two gateways) on one Redis, 200 admissions at once: exactly the budget
    (each reserves 7 of 700: 100 admitted), whatever the interleaving."""
    prefix = f"x{uuid.uuid4().hex[:6]}:"
    clients = [aioredis.from_url(redis_server.url) for _ in range(2)]
    limiters = [RedisLimiter(client, prefix) for client in clients]
    account = budgets(Budget(name="daily", window="day", tokens=700))

    async def one(n: int) -> bool:
        try:
            await limiters[n % 2].admit(account, 0, 7, f"r{n}")
            return True
        except BudgetSpent:
            return False

    results = await asyncio.gather(*(one(n) for n in range(200)))
    assert sum(results) == 100
    (spent,) = await limiters[0].spent(account.id, account.budgets)
    assert (spent.used, spent.refused) == (700, 100)
    for client in clients:
        await client.aclose()


@session
async def test_budgets_turn_over_at_midnight_utc_on_redis_time(
        redis_server: RedisServer) -> None:
    client = aioredis.from_url(redis_server.url)
    prefix = f"m{uuid.uuid4().hex[:6]}:"
    limiter = RedisLimiter(client, prefix)
    account = budgets(Budget(name="daily", window="day", tokens=10))
    limiter.now = str(at("2026-12-07T23:59:30"))
    await limiter.admit(account, 0, 10, "a")
    with pytest.raises(BudgetSpent) as refused:
        await limiter.admit(account, 0, 1, "b")
    assert refused.value.headers["retry-after"] == "30"
    limiter.now = str(at("2026-12-08T00:00:00"))
    admitted = await limiter.admit(account, 0, 10, "c")
    assert admitted.holds[0].window == "20261208"
    key = budget_key(prefix, account.id, "daily")
    assert int(await client.hget(key + "20261207", "used")) == 10
    assert await client.ttl(key + "20261208") > 0  # the window's keys expire
    await client.aclose()


@session
async def test_admitted_while_redis_is_away_its_cost_counts_when_it_settles(
        redis_server: RedisServer) -> None:
    """The per-minute limits' rule: admitted without a check while Redis is unreachable;
    its real cost counts in the window current when its settlement reaches Redis."""
    prefix = f"o{uuid.uuid4().hex[:6]}:"
    away = aioredis.from_url("redis://127.0.0.1:1", socket_connect_timeout=0.2)
    account = budgets(Budget(name="daily", window="day", tokens=10))
    admitted = await RedisLimiter(away, prefix).admit(account, 0, 500, "a")
    assert [h.window for h in admitted.holds] == [""]
    await away.aclose()
    client = aioredis.from_url(redis_server.url)
    limiter = RedisLimiter(client, prefix)
    ledger = RedisLedger(client, prefix, limiter=limiter)
    await ledger.start()
    await Pair(limiter, ledger).end(admitted, 3, 8, cached=1)
    await ledger.stop()
    (spent,) = await limiter.spent(account.id, account.budgets)
    assert spent.used == 11
    with pytest.raises(BudgetSpent):  # past the budget now: refused
        await limiter.admit(account, 0, 1, "b")
    await client.aclose()


@session
async def test_an_admission_retried_after_a_lost_answer_reserves_once(
        redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The script ran but its answer was lost (a timeout): the same try, sent again, finds
    the request's holds and reserves nothing more. A new try under the same record id (a
    batch line run again) is checked and reserved anew."""
    client = aioredis.from_url(redis_server.url)
    limiter = RedisLimiter(client, f"l{uuid.uuid4().hex[:6]}:")
    account = budgets(Budget(name="daily", window="day", tokens=100))
    monkeypatch.setattr(redis_limits.random, "getrandbits", lambda bits: 7)  # one try
    first = await limiter.admit(account, 0, 30, "same")
    again = await limiter.admit(account, 0, 30, "same")
    assert [h.used for h in first.holds] == [h.used for h in again.holds] == [30]
    assert again.bucket == first.bucket
    monkeypatch.setattr(redis_limits.random, "getrandbits", lambda bits: 8)  # a new try
    rerun = await limiter.admit(account, 0, 60, "same")
    assert [h.used for h in rerun.holds] == [90]
    monkeypatch.setattr(redis_limits.random, "getrandbits", lambda bits: 9)
    with pytest.raises(BudgetSpent):  # checked like any other: 90 + 30 > 100
        await limiter.admit(account, 0, 30, "same")
    await client.aclose()


@session
async def test_a_request_admitted_whose_answer_was_lost_settles_against_its_holds(
        redis_server: RedisServer) -> None:
    """The connection broke after the script ran: the gateway admitted it unchecked (no
    window known), and the settlement finds what the script reserved: counted once."""
    prefix = f"h{uuid.uuid4().hex[:6]}:"
    client = aioredis.from_url(redis_server.url)
    limiter = RedisLimiter(client, prefix)
    ledger = RedisLedger(client, prefix, limiter=limiter)
    await ledger.start()
    account = budgets(Budget(name="daily", window="day", tokens=100))
    await limiter.admit(account, 0, 40, "lost")  # the script ran; its answer "lost"
    unchecked = Admission("lost", account.id, limited=True,
                          holds=[Hold(account.budgets[0], "")])
    await Pair(limiter, ledger).end(unchecked, 3, 7)
    await Pair(limiter, ledger).end(unchecked, 3, 7)  # sent again: the same record id
    await ledger.stop()
    (spent,) = await limiter.spent(account.id, account.budgets)
    assert spent.used == 10  # the 40 reserved, settled to its cost; once
    await client.aclose()


@session
async def test_more_reserved_for_a_fallback_under_the_same_budget(pair: Pair) -> None:
    account = budgets(Budget(name="daily", window="day", tokens=100, input_weight=0,
                             cached_weight=0))
    admitted = await admit(pair, account, 5, 40, "a")
    assert isinstance(admitted, Admission)
    await pair.limiter.extend(account, admitted, 50)
    assert admitted.generated_reserved == 90 and admitted.holds[0].reserved == 90
    with pytest.raises(BudgetSpent):
        await pair.limiter.extend(account, admitted, 11)
    assert admitted.holds[0].reserved == 90  # unchanged when refused
    await pair.end(admitted, 5, 20)
    (spent,) = await pair.limiter.spent(account.id, account.budgets)
    assert spent.used == 20
