"""Per-account rate limits and budgets in Redis, shared by every gateway replica
(limits.py says the rules; this is their Redis form).

Admission is one Lua script, so any number of gateway replicas together admit exactly the
limits. Windows slide over the last 60 seconds in one-second buckets (a hash per account and
kind: second -> amount) on Redis' own clock, so gateway clocks do not matter. Token limits
reserve on admission and are settled with the real usage when the request ends
(redis_ledger.py's settlement, in the same Redis instance). Concurrency is a sorted set of
admitted requests scored by a deadline, which the gateway holding the slot pushes forward
while the request runs (`slot_lifetime`, refreshed every third of it), so a long stream keeps
its slot and a gateway that dies holding slots frees them within one lifetime. The slot is
freed as the request ends, by the limiter itself, not with the usage record: after an outage
the records wait in a backlog, and an account must not be refused for requests that have
ended.

Budgets (budgets.py) are checked in the same script, after the per-minute limits. What an
admitted request holds of each budget is kept beside it (`hold_key`: window and reservation
per budget, and the mark of the try that made it) until its settlement, which reads it: a
try retried after a lost answer reserves once, and a request admitted while its answer was
lost is settled against what it really reserved. (A batch line run again under its record
id is a new try: checked and reserved anew.) A fallback target that may generate more than
was reserved reserves the difference (`extend`), under the same rules, beside the
admission's reservation.

When Redis cannot be reached (connection refused or lost) the gateway admits without limits
(availability first); when Redis is reachable but the check fails (a script error, or no
answer in time twice) the request is refused with 503: a limit must not fail open because
Redis is slow or the request is odd. Both are logged and counted
(`fwgw_limiter_degraded{reason, outcome}`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.background import cancel, every
from gateway.controlplane.budgets import WINDOW_LUA, Budget, Hold, budget_key, window
from gateway.controlplane.limits import (
    KINDS,
    MAX_RESERVATION,
    Admission,
    BudgetReport,
    BudgetSpent,
    RateLimited,
    Spent,
    budget_reserves,
    limit_headers,
)
from gateway.controlplane.registry import Account
from gateway.errors import GatewayError

logger = logging.getLogger("gateway.limits")
# Ended requests' slots waiting to be freed while Redis is away; past this many, the newest
# are left to expire (within a slot lifetime).
MAX_ENDED = 10_000
HOLD_LIFETIME = 2 * 86_400  # a request's budget holds, if it is never settled


# KEYS: requests, prompt, generated (hashes second -> amount), concurrent (zset), then with
#       budgets: the request's holds (hold_key), and each budget's key prefix
#       (budgets.budget_key; + the window's id)
# ARGV: rpm, prompt tpm, generated tpm, concurrency (0 = unlimited), prompt reserve,
#       generated reserve, record id, concurrency slot lifetime (s), the time ('' = Redis'
#       own; tests only), 'admit:<this try's mark>' or 'extend:<the admission's bucket>'
#       (more for an admitted request: no request counted, its bucket and its holds'
#       windows), then per budget: window kind, tokens, reserve, shadow, then with budgets
#       the holds' lifetime
# Returns {admitted, rejected kind index (0 none, 5 a budget), retry after s, bucket,
#   used x 4, then admitted: per budget its window id and spend; refused by a budget: its
#   index and spend}.
ADMIT_LUA = WINDOW_LUA + """
local t = redis.call('TIME')
local now = tonumber(t[1])
local nowf = now + tonumber(t[2]) / 1e6
if ARGV[9] ~= '' then now = tonumber(ARGV[9]); nowf = now end
local mode, mark = string.match(ARGV[10], '^(%a+):(.*)$')
local extend = mode == 'extend'
local nb = math.max(#KEYS - 5, 0)
local holds = KEYS[5]
if nb > 0 and not extend and redis.call('HGET', holds, 'try') == mark then
  -- an earlier try of this same admission was admitted (its answer lost): that one stands
  local out = {1, 0, 0, tonumber(redis.call('HGET', holds, 'bucket')) or now, 0, 0, 0, 0}
  for i = 1, nb do
    local id = string.match(redis.call('HGET', holds, i) or '', '^([^|]*)|')
    out[#out + 1] = id or ''
    out[#out + 1] = tonumber(redis.call('HGET', KEYS[5 + i] .. (id or ''), 'used') or '0')
  end
  return out
end
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
local bkeys, bused, bends, bids, bheld, refused = {}, {}, {}, {}, {}, 0
if reject == 0 then
  for i = 1, nb do
    local a = 10 + (i - 1) * 4
    bids[i], bends[i] = window(ARGV[a + 1], now)
    bheld[i] = 0
    if extend then  -- more in the window the request holds
      local id, held = string.match(redis.call('HGET', holds, i) or '', '^([^|]*)|(%d+)')
      if id then bids[i], bheld[i] = id, tonumber(held) end
    end
    bkeys[i] = KEYS[5 + i] .. bids[i]
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
local bucket = now
if extend and redis.call('HEXISTS', KEYS[3], mark) == 1 then
  bucket = tonumber(mark)  -- beside what the request reserved at admission
end
if not extend then redis.call('HINCRBY', KEYS[1], now, 1) end
redis.call('HINCRBY', KEYS[2], bucket, preserve)
redis.call('HINCRBY', KEYS[3], bucket, greserve)
if conc > 0 then redis.call('ZADD', KEYS[4], nowf + tonumber(ARGV[8]), ARGV[7]) end
for i = 1, 4 do redis.call('EXPIRE', KEYS[i], 3600) end
local out = {1, 0, 0, now, requests + 1, prompt + preserve, generated + greserve,
             concurrent + 1}
if nb > 0 and not extend then redis.call('HSET', holds, 'bucket', now, 'try', mark) end
for i = 1, nb do
  local a = 10 + (i - 1) * 4
  local reserve = tonumber(ARGV[a + 3])
  if not extend and bused[i] + reserve > tonumber(ARGV[a + 2]) then
    redis.call('HINCRBY', bkeys[i], 'shadow', 1)  -- (a request counts once)
  end
  out[#out + 1] = bids[i]
  out[#out + 1] = redis.call('HINCRBY', bkeys[i], 'used', reserve)
  redis.call('EXPIREAT', bkeys[i], bends[i] + 86400)
  redis.call('HSET', holds, i, bids[i] .. '|' .. (bheld[i] + reserve))
end
if nb > 0 then redis.call('EXPIRE', holds, ARGV[11 + nb * 4]) end
return out
"""


# KEYS: concurrent zsets; ARGV: lifetime, then the slot (record id) in each
REFRESH_LUA = """
local t = redis.call('TIME')
local deadline = tonumber(t[1]) + tonumber(t[2]) / 1e6 + tonumber(ARGV[1])
for i = 1, #KEYS do redis.call('ZADD', KEYS[i], 'XX', deadline, ARGV[i + 1]) end
return #KEYS
"""


def text(value: bytes | str) -> str:
    """A Redis answer's string (bytes unless the client decodes them)."""
    return value.decode() if isinstance(value, bytes) else value


def limit_keys(prefix: str, account: str) -> list[str]:
    base = f"{prefix}limits:{account}:"
    return [base + "requests", base + "prompt", base + "generated", base + "concurrent"]


def hold_key(prefix: str, record_id: str) -> str:
    """What a request holds of its account's budgets, until it is settled: `bucket`, and per
    budget (1, 2, ...) `<window id>|<tokens reserved>`."""
    return f"{prefix}budget:held:{record_id}"


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
        result = await self._check(account, [
            limits.requests_per_minute, limits.prompt_tokens_per_minute,
            limits.generated_tokens_per_minute, limits.concurrent_requests,
            prompt_tokens, generated_tokens, record_id, self.slot_lifetime, self.now,
            f"admit:{random.getrandbits(64):x}"], reserves, record_id)
        if result is None:  # unreachable: admitted unchecked
            if limits.concurrent_requests:
                # The script may have taken the slot before the connection broke: it is
                # freed at the end like any other (freeing one never taken is harmless).
                self.held[record_id] = account.id
            # Budgets count the request's cost when it settles (against what it holds, if
            # the script did run).
            admission.holds = [Hold(budget, "") for budget in budgets]
            return admission
        headers = self._answer(account, result, reserves)
        admission.prompt_reserved = prompt_tokens
        admission.generated_reserved = generated_tokens
        admission.bucket = int(result[3])
        admission.headers = headers
        for i, (budget, reserve) in enumerate(zip(budgets, reserves, strict=True)):
            window_id, spent = text(result[8 + 2 * i]), int(result[9 + 2 * i])
            admission.holds.append(Hold(budget, window_id, reserve, spent))
        if limits.concurrent_requests:
            self.held[record_id] = account.id
        return admission

    async def extend(self, account: Account, admission: Admission,
                     generated_tokens: int) -> None:
        generated_tokens = min(generated_tokens, MAX_RESERVATION)
        limits, budgets = account.limits, account.budgets
        reserves = budget_reserves(budgets, 0, generated_tokens)
        result = await self._check(account, [
            0, 0, limits.generated_tokens_per_minute, 0, 0, generated_tokens,
            admission.record_id, self.slot_lifetime, self.now,
            f"extend:{admission.bucket}"], reserves, admission.record_id)
        if result is None:
            return  # unreachable: the settlement counts what it used
        self._answer(account, result, reserves, extending=True)
        admission.generated_reserved += generated_tokens
        for i, (hold, reserve) in enumerate(zip(admission.holds, reserves, strict=True)):
            hold.reserved += reserve
            hold.window, hold.used = text(result[8 + 2 * i]), int(result[9 + 2 * i])

    async def _check(self, account: Account, args: list[Any], reserves: list[int],
                     record_id: str) -> Any:
        """ADMIT_LUA's answer; None when Redis cannot be reached (admitted unchecked)."""
        budgets = account.budgets
        for budget, reserve in zip(budgets, reserves, strict=True):
            args += [budget.window, budget.tokens, reserve, int(budget.shadow)]
        keys = limit_keys(self.prefix, account.id)
        if budgets:
            args.append(HOLD_LIFETIME)
            keys += [hold_key(self.prefix, record_id), *(
                budget_key(self.prefix, account.id, budget.name) for budget in budgets)]
        for attempt in (1, 2):
            try:
                result = await self._script(keys=keys, args=args)
                break
            except (RedisTimeoutError, TimeoutError) as exc:
                # Slow, not gone: once more (the slot and the budgets' holds are keyed by
                # the record id, so a first try that did land is only counted again in the
                # rate windows).
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
                return None
            except RedisError as exc:
                logger.error("rate limits unchecked, request refused: %r", exc)
                self.degraded("error", "refused")
                raise limits_unchecked("an error in the check") from exc
        self._reachable.set()
        return result

    def _answer(self, account: Account, result: Any, reserves: list[int],
                extending: bool = False) -> dict[str, str]:
        """The limits' headers of an admission, or its refusal raised; budgets reported
        (a shadow refusal once per request: not again when it reserves more)."""
        budgets = account.budgets
        reject, wait = int(result[1]), int(result[2])
        used = dict(zip(KINDS, (int(v) for v in result[4:8]), strict=True))
        headers = limit_headers(account.limits, used)
        if reject == 5:
            index, spent = int(result[8]) - 1, int(result[9])
            self.report(account.id, budgets[index], spent, "refused")
            raise BudgetSpent(budgets[index], spent, reserves[index], wait, headers)
        if reject:
            raise RateLimited(KINDS[reject - 1], wait, headers)
        for i, budget in enumerate(budgets):
            spent = int(result[9 + 2 * i])
            self.report(account.id, budget, spent,
                        "shadow" if spent > budget.tokens and not extending else "admitted")
        return headers

    def settle(self, admission: Admission, prompt_tokens: int, generated_tokens: int,
               cached_tokens: int = 0) -> None:
        account = self.held.pop(admission.record_id, None)
        if account is not None and len(self.ended) < MAX_ENDED:  # (past it: they expire)
            self.ended.append((account, admission.record_id))
            self._ended_wake.set()

    async def spent(self, account: str, budgets: list[Budget]) -> list[Spent]:
        """Each budget's current window as Redis holds it (on Redis' clock)."""
        now = (await self.client.time())[0]
        windows = [window(b.window, now) for b in budgets]
        async with self.client.pipeline(transaction=False) as pipe:
            for budget, (window_id, _) in zip(budgets, windows, strict=True):
                pipe.hgetall(budget_key(self.prefix, account, budget.name) + window_id)
            found = await pipe.execute()
        return [Spent.of(budget, window_id, ends, {text(k): int(v) for k, v in values.items()})
                for budget, (window_id, ends), values in zip(budgets, windows, found,
                                                              strict=True)]
