"""Usage records and limit settlement in Redis, exactly once, across outages and a full Redis.

A request's end is two writes, to two Redis instances that may be one (docs/operations.md,
"Redis"):
- the **settlement** (state instance, beside the limit windows): the request's token
  reservations corrected to the real counts; `SETTLE_LUA`, made idempotent by a marker that
  lives two windows (a reservation older than the window no longer counts, so settling it
  again changes nothing; a request admitted while Redis was unreachable is counted "now",
  so a retry more than two windows after a lost reply would count it twice);
- the **record** (bulk instance): `RECORD_LUA` adds the record id to the set of records
  written (a sorted set trimmed to `marker_ttl` seconds, with no TTL of its own, so a bulk
  Redis that evicts expiring keys never evicts it), XADDs the record to the `<prefix>usage`
  stream (trimmed to about `max_length`) and adds it to the account's totals
  (`<prefix>usage:totals:<account>`, so reading usage never reads the stream).

Each write is queued in process and sent in pipelined batches by one task per instance,
retried while that instance is unreachable or full. A request's end is pending until both are
in. Settlements of requests that hold reservations go first: after an outage, the ends of
requests admitted while Redis was away must not hold back the settling of those admitted
since (their account would be refused for tokens it did not use). Nothing is dropped: past
`max_pending` pending ends the gateway refuses new requests with 503 (`backlogged`) until
Redis takes them, and records still queued at shutdown are written to the log in full. A
write Redis refuses at its memory bound (maxmemory) is counted (`on_refused`) and logged.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import OutOfMemoryError

from gateway.background import cancel
from gateway.controlplane.budgets import WINDOW_LUA, budget_key
from gateway.controlplane.limits import WINDOW, Admission, Limiter
from gateway.controlplane.redis_limits import hold_key, limit_keys, text
from gateway.controlplane.usage import (
    RECORD_FIELDS,
    Backlog,
    UsageRecord,
    UsageTotals,
    record_json,
    usage_record,
)

logger = logging.getLogger("gateway.usage")

# KEYS: the settlement's marker, prompt, generated (redis_limits.py), then with budgets:
#       the request's holds (redis_limits.hold_key) and each budget's key prefix
# ARGV: bucket (-1: nothing reserved), prompt reserved, used, generated reserved, used,
#       the marker's lifetime (s), then per budget: window kind, the request's cost
SETTLE_LUA = WINDOW_LUA + """
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[6]) then return 0 end
local now = tonumber(redis.call('TIME')[1])
local bucket = tonumber(ARGV[1])
if bucket >= 0 then
  if redis.call('HEXISTS', KEYS[2], bucket) == 1 then
    redis.call('HINCRBY', KEYS[2], bucket, tonumber(ARGV[3]) - tonumber(ARGV[2]))
  end
  if redis.call('HEXISTS', KEYS[3], bucket) == 1 then
    redis.call('HINCRBY', KEYS[3], bucket, tonumber(ARGV[5]) - tonumber(ARGV[4]))
  end
else
  -- admitted while Redis was unreachable: count what it used, now
  redis.call('HINCRBY', KEYS[2], now, ARGV[3])
  redis.call('HINCRBY', KEYS[3], now, ARGV[5])
  redis.call('EXPIRE', KEYS[2], 3600)
  redis.call('EXPIRE', KEYS[3], 3600)
end
local holds = KEYS[4]
for i = 1, #KEYS - 4 do
  local kind, cost = ARGV[5 + i * 2], tonumber(ARGV[6 + i * 2])
  local id, held = string.match(redis.call('HGET', holds, i) or '', '^([^|]*)|(%d+)')
  if id then  -- the reservation it holds, corrected to its cost
    if redis.call('EXISTS', KEYS[4 + i] .. id) == 1 then
      redis.call('HINCRBY', KEYS[4 + i] .. id, 'used', cost - tonumber(held))
    end
  elseif bucket < 0 then  -- admitted unchecked (Redis unreachable): its cost counts now
    local current, ends = window(kind, now)
    redis.call('HINCRBY', KEYS[4 + i] .. current, 'used', cost)
    redis.call('EXPIREAT', KEYS[4 + i] .. current, ends + 86400)
  end  -- (else settled already: its holds are gone)
end
if #KEYS > 4 then redis.call('DEL', holds) end
return 1
"""

# KEYS: the records written (sorted set: id -> ms), the usage stream, the account's totals
#       (hash), the set of accounts with totals
# ARGV: record id, how long an id is kept (s), stream max length, account, status, prompt,
#       cached and completion tokens, then the record's field/value pairs
# The ZADD comes first: at maxmemory Redis refuses a script's first write, and then nothing.
RECORD_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('ZADD', KEYS[1], 'NX', now, ARGV[1]) == 0 then return 0 end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]) * 1000)
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', unpack(ARGV, 9))
redis.call('HINCRBY', KEYS[3], 'requests', 1)
redis.call('HINCRBY', KEYS[3], 'prompt_tokens', ARGV[6])
redis.call('HINCRBY', KEYS[3], 'cached_tokens', ARGV[7])
redis.call('HINCRBY', KEYS[3], 'completion_tokens', ARGV[8])
redis.call('HINCRBY', KEYS[3], 'status:' .. ARGV[5], 1)
redis.call('SADD', KEYS[4], ARGV[4])
return 1
"""


def _fields(record: UsageRecord) -> list[str]:
    fields: list[str] = []
    for key in RECORD_FIELDS:
        value = getattr(record, key)
        shown = orjson.dumps(value).decode() if isinstance(value, dict) else str(value)
        fields += [key, "" if value is None else shown]
    return fields


@dataclass(slots=True, eq=False)
class Ending:
    """One request's end while some of it is not yet in Redis."""

    record: UsageRecord
    admission: Admission
    parts: int  # writes left: the settlement and/or the record


Write = Callable[[Ending, aioredis.client.Pipeline], Awaitable[None]]


class Lane:
    """One instance's share of the ends, sent in batches by one task: `first` before `then`,
    each left queued until the instance has it."""

    def __init__(self, name: str, client: aioredis.Redis, write: Write) -> None:
        self.name = name  # "usage" (records) or "limits" (settlements): logs and metrics
        self.client = client
        self.write = write
        self.first: deque[Ending] = deque()
        self.then: deque[Ending] = deque()
        self.wake = asyncio.Event()

    def __len__(self) -> int:
        return len(self.first) + len(self.then)


class RedisLedger:
    def __init__(self, client: aioredis.Redis, prefix: str = "fwgw:",
                 max_length: int = 10_000_000, max_pending: int = 100_000,
                 limiter: Limiter | None = None, batch: int = 256, marker_ttl: int = 3600,
                 on_backlog: Callable[[Backlog], None] = lambda backlog: None, *,
                 state: aioredis.Redis | None = None,
                 on_refused: Callable[[str], None] = lambda name: None) -> None:
        """Records go to `client` (the bulk instance), settlements to `state` (the limits'
        instance; `client` when None)."""
        self.prefix = prefix
        self.stream = f"{prefix}usage"
        self.max_length = max_length
        self.marker_ttl = marker_ttl  # how long a record's id stops a second count
        self.max_pending = max_pending
        self.limiter = limiter
        self.batch = batch
        self.on_backlog = on_backlog  # told after every batch sent or failed
        self.on_refused = on_refused  # a batch Redis refused at its memory bound
        self._record = client.register_script(RECORD_LUA)
        state = state or client
        self._settle = state.register_script(SETTLE_LUA)
        self.records = Lane("usage", client, self._append)
        self.settlements = Lane("limits", state, self._settle_one)
        self.pending = 0  # ends with a write left (never bounded by dropping: `backlogged`)
        self._tasks: list[asyncio.Task[None]] = []

    def finish(self, record: UsageRecord, admission: Admission) -> None:
        if self.limiter is not None:  # in-process bookkeeping; Redis settles in the script
            self.limiter.settle(admission, record.prompt_tokens, record.completion_tokens,
                               record.cached_tokens)
        # Holding reservations: settled first; admitted without Redis: its usage is counted
        # now; no limits: nothing to settle.
        settle = (self.settlements.first if admission.bucket is not None
                  else self.settlements.then if admission.limited else None)
        ending = Ending(record, admission, 1 if settle is None else 2)
        self.records.then.append(ending)
        if settle is not None:
            settle.append(ending)
        self.pending += 1
        self.records.wake.set()
        self.settlements.wake.set()

    @property
    def backlogged(self) -> bool:
        return self.pending >= self.max_pending

    def backlog(self) -> Backlog:
        ends = [lane[0].record.time for lane in (self.records.first, self.records.then,
                                                  self.settlements.first,
                                                  self.settlements.then) if lane]
        return Backlog(self.pending, max(time.time() - min(ends), 0.0) if ends else 0.0)

    def unwritten(self, record_id: str) -> bool:
        return any(ending.record.record_id == record_id
                   for ending in itertools.chain(self.records.first, self.records.then))

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._send(lane), name=f"usage-ledger-{lane.name}")
                       for lane in (self.records, self.settlements)]

    async def stop(self, timeout: float = 5.0) -> None:
        """Give queued writes a few seconds to reach Redis, then stop."""
        deadline = time.monotonic() + timeout
        while self.pending and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if len(self.records):
            logger.error("%d usage records not written to Redis (unreachable or full at "
                         "shutdown); here they are:", len(self.records))
            for ending in itertools.chain(self.records.first, self.records.then):
                logger.error("usage %s", record_json(ending.record))
        if len(self.settlements):
            logger.error("%d requests' rate-limit reservations not settled in Redis "
                         "(they expire with their window)", len(self.settlements))
        for task in self._tasks:
            await cancel(task)

    async def _send(self, lane: Lane) -> None:
        failing = False
        while True:
            await lane.wake.wait()
            lane.wake.clear()
            while len(lane):
                first = list(itertools.islice(lane.first, self.batch))
                then = list(itertools.islice(lane.then, self.batch - len(first)))
                try:
                    async with lane.client.pipeline(transaction=False) as pipe:
                        for ending in first + then:
                            await lane.write(ending, pipe)
                        await pipe.execute()
                except Exception as exc:  # Redis down, full, or anything else: keep them
                    full = isinstance(exc, OutOfMemoryError)
                    if full:
                        self.on_refused(lane.name)
                    if not failing:
                        logger.warning(
                            "%s queued until Redis takes them: %s", lane.name,
                            f"Redis is full (maxmemory) and refused them: {exc}" if full
                            else repr(exc))
                    failing = True
                    self.on_backlog(self.backlog())
                    await asyncio.sleep(0.2)
                    continue
                if failing:
                    logger.warning("%s: Redis takes them again", lane.name)
                failing = False
                for queue, sent in ((lane.first, len(first)), (lane.then, len(then))):
                    for _ in range(sent):
                        ending = queue.popleft()
                        ending.parts -= 1
                        if not ending.parts:
                            self.pending -= 1
                self.on_backlog(self.backlog())

    async def _append(self, ending: Ending, pipe: aioredis.client.Pipeline) -> None:
        """Queues the record's script in `pipe`: a batch half applied before a lost
        connection is sent again whole, and each record's id counts it once."""
        record = ending.record
        await self._record(
            keys=[f"{self.prefix}usage:written", self.stream,
                  f"{self.prefix}usage:totals:{record.account}", f"{self.prefix}usage:accounts"],
            args=[record.record_id, self.marker_ttl, self.max_length, record.account,
                  record.status, record.prompt_tokens, record.cached_tokens,
                  record.completion_tokens, *_fields(record)],
            client=pipe)

    async def _settle_one(self, ending: Ending, pipe: aioredis.client.Pipeline) -> None:
        record, admission = ending.record, ending.admission
        bucket = admission.bucket if admission.bucket is not None else -1
        args: list[int | str] = [bucket, admission.prompt_reserved, record.prompt_tokens,
                                 admission.generated_reserved, record.completion_tokens,
                                 2 * WINDOW]
        keys = [f"{self.prefix}usage:settled:{record.record_id}",
                *limit_keys(self.prefix, record.account)[1:3]]
        if admission.holds:
            keys.append(hold_key(self.prefix, record.record_id))
        for hold in admission.holds:
            budget = hold.budget
            keys.append(budget_key(self.prefix, record.account, budget.name))
            args += [budget.window, budget.cost(record.prompt_tokens, record.cached_tokens,
                                                record.completion_tokens)]
        await self._settle(keys=keys, args=args, client=pipe)

    async def totals(self) -> dict[str, UsageTotals]:
        return await read_totals(self.records.client, self.prefix)


async def read_totals(client: aioredis.Redis, prefix: str) -> dict[str, UsageTotals]:
    """Every account's usage totals: one hash per account, never the whole stream."""
    accounts = sorted(text(a) for a in await client.smembers(f"{prefix}usage:accounts"))
    async with client.pipeline(transaction=False) as pipe:
        for account in accounts:
            pipe.hgetall(f"{prefix}usage:totals:{account}")
        hashes = await pipe.execute()
    totals: dict[str, UsageTotals] = {}
    for account, fields in zip(accounts, hashes, strict=True):
        values = {text(k): int(v) for k, v in fields.items()}
        totals[account] = UsageTotals(
            requests=values.get("requests", 0), prompt_tokens=values.get("prompt_tokens", 0),
            cached_tokens=values.get("cached_tokens", 0),
            completion_tokens=values.get("completion_tokens", 0),
            by_status={k.removeprefix("status:"): v for k, v in values.items()
                       if k.startswith("status:")})
    return totals


async def read_records(client: aioredis.Redis, stream: str,
                       page: int = 1000) -> list[UsageRecord]:
    records: list[UsageRecord] = []
    start = "-"
    while True:
        entries: Any = await client.xrange(
            stream, min=start, count=page) or []
        for _, fields in entries:
            values: dict[str, Any] = {text(k): text(v) for k, v in fields.items()}
            for optional in ("ttft_ms", "metadata"):
                if values.get(optional) == "":
                    values.pop(optional)
            if "metadata" in values:
                values["metadata"] = orjson.loads(values["metadata"])
            records.append(usage_record(values))
        if len(entries) < page:
            return records
        start = "(" + text(entries[-1][0])

