"""Per-account rate limits: requests per minute, prompt and generated tokens per minute,
concurrent requests.

With Redis, admission is one Lua script, so any number of gateway replicas together admit
exactly the limit. Windows slide over the last 60 seconds in one-second buckets (a hash per
account and kind: second -> amount) on Redis' own clock, so gateway clocks do not matter.
Token limits reserve on admission (an estimate of the prompt, and max_tokens x n) and are
settled with the real usage when the request ends (redis_ledger.py's settlement, in the same
Redis instance as the windows). Concurrency is a sorted set of admitted requests scored by a
deadline, which the gateway holding the slot pushes forward while the request runs
(`slot_lifetime`, refreshed every third of it), so a long stream keeps its slot and a gateway
that dies holding slots frees them within one lifetime. The slot is freed as the request
ends, by the limiter itself, not with the usage record: after an outage the records wait in a
backlog, and an account must not be refused for requests that have ended.

An account's token budgets over a UTC day or month (budgets.py) are checked in the same
script, after the per-minute limits: a request is admitted only when both admit it, and its
budget reservation is settled with the rest.

Without Redis the same rules run in process (`LocalLimiter`). When Redis cannot be reached
(connection refused or lost) the gateway admits without limits (availability first); when
Redis is reachable but the check fails (a script error, or no answer in time twice) the
request is refused with 503: a limit must not fail open because Redis is slow or the request
is odd. Both are logged and counted (`fwgw_limiter_degraded{reason, outcome}`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.background import cancel, every
from gateway.controlplane.budgets import (
    WINDOW_LUA,
    Budget,
    Hold,
    LocalBudgets,
    Refusal,
    budget_key,
    window,
)
from gateway.controlplane.registry import Account, Limits
from gateway.errors import GatewayError

logger = logging.getLogger("gateway.limits")
WINDOW = 60  # seconds
KINDS = ("requests", "prompt_tokens", "generated_tokens", "concurrent_requests")
# No reservation is larger (Redis counts in 64-bit integers; Lua numbers lose integers
# past 2^53 and print large ones in exponent form, which HINCRBY refuses).
MAX_RESERVATION = 1 << 40
# Ended requests' slots waiting to be freed while Redis is away; past this many, the newest
# are left to expire (within a slot lifetime).
MAX_ENDED = 10_000


@dataclass
class Admission:
    """One admitted request's reservation."""

    record_id: str
    account: str
    limited: bool = False  # the account has limits (its usage counts against them)
    prompt_reserved: int = 0
    generated_reserved: int = 0
    bucket: int | None = None  # the reservation's second; None when nothing was reserved
    headers: dict[str, str] = field(default_factory=dict)
    holds: list[Hold] = field(default_factory=list)  # one per budget of the account


def limit_headers(limits: Limits, used: dict[str, int]) -> dict[str, str]:
    """Spec 4.3, per-minute values. Only for accounts that have limits."""
    headers: dict[str, str] = {}
    if limits.requests_per_minute:
        remaining = max(limits.requests_per_minute - used["requests"], 0)
        headers["x-ratelimit-limit-requests"] = str(limits.requests_per_minute)
        headers["x-ratelimit-remaining-requests"] = str(remaining)
        headers["x-ratelimit-over-limit"] = "yes" if remaining == 0 else "no"
    if limits.prompt_tokens_per_minute:
        headers["x-ratelimit-limit-tokens-prompt"] = str(limits.prompt_tokens_per_minute)
    if limits.generated_tokens_per_minute:
        headers["x-ratelimit-limit-tokens-generated"] = str(limits.generated_tokens_per_minute)
        headers["x-ratelimit-remaining-tokens-generated"] = str(
            max(limits.generated_tokens_per_minute - used["generated_tokens"], 0))
    return headers


class RateLimited(GatewayError):
    def __init__(self, kind: str, retry_after: int, headers: dict[str, str],
                 message: str = "") -> None:
        what = {"requests": "requests per minute", "prompt_tokens": "prompt tokens per minute",
                "generated_tokens": "generated tokens per minute",
                "concurrent_requests": "concurrent requests"}.get(kind, kind)
        super().__init__(429, message or f"Rate limit exceeded: {what} for this account",
                         headers=headers | {"retry-after": str(max(retry_after, 1))})
        self.kind = kind


class BudgetSpent(RateLimited):
    """429 until the window's end: the request's reservation does not fit what is left of
    one of the account's budgets."""

    def __init__(self, budget: Budget, used: int, reserve: int, retry_after: int,
                 headers: dict[str, str] | None = None) -> None:
        left = max(budget.tokens - used, 0)
        super().__init__("budget", retry_after, headers or {}, (
            f"Token budget exceeded: this account's {budget.window} budget '{budget.name}' "
            f"has {left} of {budget.tokens} tokens left, and this request may cost "
            f"{reserve}; it renews at the start of the next UTC {budget.window}"))
        self.budget = budget


# (account, budget, the window's spend, what happened: "admitted", "refused" or "shadow":
# admitted, where the budget alone would have refused it), for the metrics and the log.
BudgetReport = Callable[[str, Budget, int, str], None]


def budget_reserves(budgets: list[Budget], prompt: int, generated: int) -> list[int]:
    return [min(b.reservation(prompt, generated), MAX_RESERVATION) for b in budgets]


def exceeds(used: int, reserve: int, limit: int, *, counts: bool) -> bool:
    """Counted kinds (requests, concurrency) stop at the limit. Token kinds stop when the
    reservation would pass it, except on an empty window, so that one request larger than the
    whole budget is not refused forever (the same rule as ADMIT_LUA)."""
    if counts:
        return used >= limit
    return used > 0 and used + reserve > limit


class Limiter(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def admit(self, account: Account, prompt_tokens: int, generated_tokens: int,
                    record_id: str) -> Admission:
        """For an account with limits (dataplane/request.py skips the others)."""

    def settle(self, admission: Admission, prompt_tokens: int, generated_tokens: int,
               cached_tokens: int = 0) -> None:
        """In-process settlement at the request's end (the Redis limiter settles in
        redis_ledger.py's settlement; here it stops refreshing the slot)."""

    async def spent(self, account: str, budgets: list[Budget]) -> list[Spent]:
        """Each budget's current window (the admin API)."""


# KEYS: requests, prompt, generated (hashes second -> amount), concurrent (zset), then each
#       budget's key prefix (budgets.budget_key; + the window's id)
# ARGV: rpm, prompt tpm, generated tpm, concurrency (0 = unlimited), prompt reserve,
#       generated reserve, record id, concurrency slot lifetime (s), the time ('' = Redis'
#       own; tests only), then per budget: window kind, tokens, reserve, shadow (1/0)
# Returns {admitted, rejected kind index (0 none, 5 a budget), retry after s, bucket,
#   used x 4, then admitted: per budget its window id and spend; refused by a budget: its
#   index and spend}.
ADMIT_LUA = WINDOW_LUA + """
local t = redis.call('TIME')
local now = tonumber(t[1])
local nowf = now + tonumber(t[2]) / 1e6
if ARGV[9] ~= '' then now = tonumber(ARGV[9]); nowf = now end
local function sliding(key)
  local items = redis.call('HGETALL', key)
  local sum, oldest = 0, now
  for i = 1, #items, 2 do
    local second = tonumber(items[i])
    if second <= now - 60 then
      redis.call('HDEL', key, items[i])
    else
      sum = sum + tonumber(items[i + 1])
      if second < oldest then oldest = second end
    end
  end
  return sum, oldest + 60 - now
end
local rpm, ptpm, gtpm, conc = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]),
  tonumber(ARGV[4])
local preserve, greserve = tonumber(ARGV[5]), tonumber(ARGV[6])
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', nowf)
local requests, rwait = sliding(KEYS[1])
local prompt, pwait = sliding(KEYS[2])
local generated, gwait = sliding(KEYS[3])
local concurrent = redis.call('ZCARD', KEYS[4])
local reject, wait = 0, 0
if conc > 0 and concurrent >= conc then reject, wait = 4, 1
elseif rpm > 0 and requests >= rpm then reject, wait = 1, rwait
elseif ptpm > 0 and prompt > 0 and prompt + preserve > ptpm then reject, wait = 2, pwait
elseif gtpm > 0 and generated > 0 and generated + greserve > gtpm then reject, wait = 3, gwait
end
local bkeys, bused, bends, bids, refused = {}, {}, {}, {}, 0
if reject == 0 then
  for i = 1, #KEYS - 4 do
    local a = 9 + (i - 1) * 4
    bids[i], bends[i] = window(ARGV[a + 1], now)
    bkeys[i] = KEYS[4 + i] .. bids[i]
    bused[i] = tonumber(redis.call('HGET', bkeys[i], 'used') or '0')
    if refused == 0 and ARGV[a + 4] ~= '1'
        and bused[i] + tonumber(ARGV[a + 3]) > tonumber(ARGV[a + 2]) then
      refused = i
    end
  end
  if refused > 0 then
    redis.call('HINCRBY', bkeys[refused], 'refused', 1)
    redis.call('EXPIREAT', bkeys[refused], bends[refused] + 86400)
    reject, wait = 5, bends[refused] - now
  end
end
if reject > 0 then
  return {0, reject, wait, now, requests, prompt, generated, concurrent, refused,
          bused[refused] or 0}
end
redis.call('HINCRBY', KEYS[1], now, 1)
redis.call('HINCRBY', KEYS[2], now, preserve)
redis.call('HINCRBY', KEYS[3], now, greserve)
if conc > 0 then redis.call('ZADD', KEYS[4], nowf + tonumber(ARGV[8]), ARGV[7]) end
for i = 1, 4 do redis.call('EXPIRE', KEYS[i], 3600) end
local out = {1, 0, 0, now, requests + 1, prompt + preserve, generated + greserve,
             concurrent + 1}
for i = 1, #KEYS - 4 do
  local a = 9 + (i - 1) * 4
  local reserve = tonumber(ARGV[a + 3])
  if bused[i] + reserve > tonumber(ARGV[a + 2]) then
    redis.call('HINCRBY', bkeys[i], 'shadow', 1)
  end
  out[#out + 1] = bids[i]
  out[#out + 1] = redis.call('HINCRBY', bkeys[i], 'used', reserve)
  redis.call('EXPIREAT', bkeys[i], bends[i] + 86400)
end
return out
"""


# KEYS: concurrent zsets; ARGV: lifetime, then the slot (record id) in each
REFRESH_LUA = """
local t = redis.call('TIME')
local deadline = tonumber(t[1]) + tonumber(t[2]) / 1e6 + tonumber(ARGV[1])
for i = 1, #KEYS do redis.call('ZADD', KEYS[i], 'XX', deadline, ARGV[i + 1]) end
return #KEYS
"""


@dataclass
class Spent:
    """A budget's current window, for the admin API."""

    budget: Budget
    window: str  # its id: YYYYMMDD or YYYYMM
    resets_at: int  # unix seconds
    used: int  # spent, with the reservations of requests in flight
    refused: int  # requests it refused
    shadow: int  # requests it would have refused (shadow mode)

    @classmethod
    def of(cls, budget: Budget, window_id: str, ends: int, values: dict[str, int]) -> Spent:
        return cls(budget, window_id, ends, values.get("used", 0), values.get("refused", 0),
                   values.get("shadow", 0))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def limit_keys(prefix: str, account: str) -> list[str]:
    base = f"{prefix}limits:{account}:"
    return [base + "requests", base + "prompt", base + "generated", base + "concurrent"]


def limits_unchecked(reason: str) -> GatewayError:
    return GatewayError(503, f"The rate limits could not be checked ({reason}); retry",
                        headers={"retry-after": "1"})


class RedisLimiter:
    def __init__(self, client: aioredis.Redis, prefix: str = "fwgw:",
                 slot_lifetime: float = 120.0,
                 degraded: Callable[[str, str], None] = lambda reason, outcome: None,
                 report: BudgetReport = lambda account, budget, used, outcome: None) -> None:
        self.prefix = prefix
        self.slot_lifetime = slot_lifetime
        self.degraded = degraded  # (reason, outcome) for the metric
        self.report = report  # budgets' outcomes, for the metrics and the log
        self.now = ""  # Redis' clock; tests set a time ("" when not)
        self.client = client
        self._script = client.register_script(ADMIT_LUA)
        self._refresh = client.register_script(REFRESH_LUA)
        self.held: dict[str, str] = {}  # concurrency slots held here: record id -> account
        self.ended: list[tuple[str, str]] = []  # slots to free: (account, record id)
        self._ended_wake = asyncio.Event()
        self._reachable = asyncio.Event()  # set by every check Redis answered
        self._admitted_unchecked = 0  # while Redis is unreachable (logged every 10 s)
        self._next_warning = 0.0
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self._tasks = [every(self.slot_lifetime / 3, self.refresh_slots,
                             "concurrency slot refresh", logger),
                       asyncio.create_task(self._free_ended(), name="concurrency slot free")]

    async def stop(self) -> None:
        if self.ended:
            with contextlib.suppress(RedisError, OSError):
                await self._free(list(self.ended))
        for task in self._tasks:
            await cancel(task)

    async def _free_ended(self) -> None:
        """Frees ended requests' slots, all those ended meanwhile in one round trip; while
        Redis is away they wait (and expire within a lifetime if it never comes back)."""
        while True:
            await self._ended_wake.wait()
            self._ended_wake.clear()
            while self.ended:
                slots, self.ended = self.ended, []
                try:
                    await self._free(slots)
                except (RedisError, OSError):
                    self.ended = (slots + self.ended)[:MAX_ENDED]
                    # Again as soon as an admission reaches Redis: slots that wait while
                    # requests are admitted again would refuse them.
                    self._reachable.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._reachable.wait(), 0.5)

    async def _free(self, slots: list[tuple[str, str]]) -> None:
        async with self.client.pipeline(transaction=False) as pipe:
            for account, record_id in slots:
                pipe.zrem(limit_keys(self.prefix, account)[3], record_id)
            await pipe.execute()

    async def refresh_slots(self) -> None:
        held = list(self.held.items())
        if held:
            await self._refresh(
                keys=[limit_keys(self.prefix, account)[3] for _, account in held],
                args=[self.slot_lifetime, *(record_id for record_id, _ in held)])

    async def admit(self, account: Account, prompt_tokens: int, generated_tokens: int,
                    record_id: str) -> Admission:
        limits, budgets = account.limits, account.budgets
        admission = Admission(record_id, account.id, limited=True)
        prompt_tokens = min(prompt_tokens, MAX_RESERVATION)
        generated_tokens = min(generated_tokens, MAX_RESERVATION)
        reserves = budget_reserves(budgets, prompt_tokens, generated_tokens)
        args: list[int | float | str] = [
            limits.requests_per_minute, limits.prompt_tokens_per_minute,
            limits.generated_tokens_per_minute, limits.concurrent_requests,
            prompt_tokens, generated_tokens, record_id, self.slot_lifetime, self.now]
        for budget, reserve in zip(budgets, reserves, strict=True):
            args += [budget.window, budget.tokens, reserve, int(budget.shadow)]
        keys = limit_keys(self.prefix, account.id) + [
            budget_key(self.prefix, account.id, budget.name) for budget in budgets]
        for attempt in (1, 2):
            try:
                result = await self._script(keys=keys, args=args)
                break
            except (RedisTimeoutError, TimeoutError) as exc:
                # Slow, not gone: once more (the slot is keyed by the record id, so a
                # first try that did land is only counted again in the rate windows).
                if attempt == 2:
                    logger.error("rate limits unchecked, request refused: Redis did not "
                                 "answer in time twice: %r", exc)
                    self.degraded("timeout", "refused")
                    raise limits_unchecked("no answer in time") from exc
            except (RedisConnectionError, OSError) as exc:
                self._admitted_unchecked += 1
                if time.monotonic() >= self._next_warning:  # once per 10 s, not per request
                    self._next_warning = time.monotonic() + 10
                    logger.warning("rate limits not enforced, %d requests admitted since the "
                                   "last warning: Redis unreachable: %r",
                                   self._admitted_unchecked, exc)
                    self._admitted_unchecked = 0
                self.degraded("unreachable", "admitted")
                if limits.concurrent_requests:
                    # The script may have taken the slot before the connection broke: it is
                    # freed at the end like any other (freeing one never taken is harmless).
                    self.held[record_id] = account.id
                # Budgets count the request's cost when it settles, in the window then.
                admission.holds = [Hold(budget, "") for budget in budgets]
                return admission
            except RedisError as exc:
                logger.error("rate limits unchecked, request refused: %r", exc)
                self.degraded("error", "refused")
                raise limits_unchecked("an error in the check") from exc
        self._reachable.set()
        admitted, reject, wait, bucket = (int(v) for v in result[:4])
        used = dict(zip(KINDS, (int(v) for v in result[4:8]), strict=True))
        headers = limit_headers(limits, used)
        if reject == 5:
            index, spent = int(result[8]) - 1, int(result[9])
            self.report(account.id, budgets[index], spent, "refused")
            raise BudgetSpent(budgets[index], spent, reserves[index], wait, headers)
        if not admitted:
            raise RateLimited(KINDS[reject - 1], wait, headers)
        admission.prompt_reserved = prompt_tokens
        admission.generated_reserved = generated_tokens
        admission.bucket = bucket
        admission.headers = headers
        for i, (budget, reserve) in enumerate(zip(budgets, reserves, strict=True)):
            window_id, spent = _text(result[8 + 2 * i]), int(result[9 + 2 * i])
            admission.holds.append(Hold(budget, window_id, reserve, spent))
            self.report(account.id, budget, spent,
                        "shadow" if spent > budget.tokens else "admitted")
        if limits.concurrent_requests:
            self.held[record_id] = account.id
        return admission

    async def spent(self, account: str, budgets: list[Budget]) -> list[Spent]:
        """Each budget's current window as Redis holds it."""
        windows = [window(b.window, time.time()) for b in budgets]
        async with self.client.pipeline(transaction=False) as pipe:
            for budget, (window_id, _) in zip(budgets, windows, strict=True):
                pipe.hgetall(budget_key(self.prefix, account, budget.name) + window_id)
            found = await pipe.execute()
        return [Spent.of(budget, window_id, ends, {_text(k): int(v) for k, v in values.items()})
                for budget, (window_id, ends), values in zip(budgets, windows, found,
                                                              strict=True)]

    def settle(self, admission: Admission, prompt_tokens: int, generated_tokens: int,
               cached_tokens: int = 0) -> None:
        account = self.held.pop(admission.record_id, None)
        if account is not None and len(self.ended) < MAX_ENDED:  # (past it: they expire)
            self.ended.append((account, admission.record_id))
            self._ended_wake.set()


class LocalLimiter:
    """The same windows in process, for a single gateway without Redis."""

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def __init__(self,
                 report: BudgetReport = lambda account, budget, used, outcome: None) -> None:
        self.budgets = LocalBudgets()
        self.report = report
        # account -> deque of [time, prompt, generated] per admitted request, and the
        # window's sums of prompt and generated (kept, not summed per request: a window can
        # hold a minute of requests)
        self.windows: dict[str, deque[list[float]]] = {}
        self.sums: dict[str, list[float]] = {}
        self.concurrent: dict[str, set[str]] = {}
        self._entries: dict[str, list[float]] = {}

    async def admit(self, account: Account, prompt_tokens: int, generated_tokens: int,
                    record_id: str) -> Admission:
        limits = account.limits
        admission = Admission(record_id, account.id, limited=True)
        now = time.monotonic()
        window = self.windows.setdefault(account.id, deque())
        sums = self.sums.setdefault(account.id, [0.0, 0.0])
        while window and window[0][0] <= now - WINDOW:
            gone = window.popleft()
            sums[0] -= gone[1]
            sums[1] -= gone[2]
            gone[0] = -1.0  # out of the window (a request still running settles nothing)
        running = self.concurrent.setdefault(account.id, set())
        used = {"requests": len(window), "prompt_tokens": int(sums[0]),
                "generated_tokens": int(sums[1]), "concurrent_requests": len(running)}
        wait = int(window[0][0] + WINDOW - now) + 1 if window else 1
        for kind, limit, reserve in (
                ("concurrent_requests", limits.concurrent_requests, 0),
                ("requests", limits.requests_per_minute, 0),
                ("prompt_tokens", limits.prompt_tokens_per_minute, prompt_tokens),
                ("generated_tokens", limits.generated_tokens_per_minute, generated_tokens)):
            if limit and exceeds(used[kind], reserve, limit, counts=reserve == 0):
                raise RateLimited(kind, 1 if kind == "concurrent_requests" else wait,
                                limit_headers(limits, used))
        reserves = budget_reserves(account.budgets, prompt_tokens, generated_tokens)
        holds = self.budgets.admit(account.id, account.budgets, reserves, time.time())
        if isinstance(holds, Refusal):
            self.report(account.id, holds.budget, holds.used, "refused")
            raise BudgetSpent(holds.budget, holds.used, holds.reserve, holds.retry_after,
                              limit_headers(limits, used))
        for hold in holds:
            self.report(account.id, hold.budget, hold.used,
                        "shadow" if hold.used > hold.budget.tokens else "admitted")
        admission.holds = holds
        entry = [now, float(prompt_tokens), float(generated_tokens)]
        window.append(entry)
        sums[0] += entry[1]
        sums[1] += entry[2]
        running.add(record_id)
        self._entries[record_id] = entry
        used["requests"] += 1
        used["generated_tokens"] += generated_tokens
        admission.prompt_reserved, admission.generated_reserved = prompt_tokens, generated_tokens
        admission.bucket = 0
        admission.headers = limit_headers(limits, used)
        return admission

    def settle(self, admission: Admission, prompt_tokens: int, generated_tokens: int,
               cached_tokens: int = 0) -> None:
        self.budgets.settle(admission.account, admission.holds, prompt_tokens, cached_tokens,
                            generated_tokens)
        self.concurrent.get(admission.account, set()).discard(admission.record_id)
        entry = self._entries.pop(admission.record_id, None)
        if entry is not None:
            if entry[0] >= 0:  # still in the window: its sums take the real counts
                sums = self.sums[admission.account]
                sums[0] += prompt_tokens - entry[1]
                sums[1] += generated_tokens - entry[2]
            entry[1], entry[2] = float(prompt_tokens), float(generated_tokens)

    async def spent(self, account: str, budgets: list[Budget]) -> list[Spent]:
        now = time.time()
        return [Spent(budget, *window(budget.window, now),
                      *self.budgets.spent(account, budget, now)) for budget in budgets]
