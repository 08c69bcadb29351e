"""Usage records: one per request, appended exactly once, also for aborted and failed ones.

With Redis a request's end is one Lua script that (a) claims the record id with SET NX, so a
retried append after a lost reply or a Redis restart never counts twice, (b) settles the
request's token reservations with the real counts (its concurrency slot the limiter frees),
(c) XADDs the record to the `<prefix>usage` stream and (d) adds it to the account's totals
(`<prefix>usage:totals:<account>`, so that reading usage never reads the stream). Ends are
queued in process and sent in pipelined batches by one task that retries while Redis is
unreachable. Records whose request holds token reservations in Redis go first: after an
outage, the records of requests admitted while Redis was away must not hold back the
settling of those admitted since (their account would be refused for tokens it did not
use). Nothing is dropped: past `max_pending` queued records the gateway refuses new requests
with 503 (`backlogged`) until Redis takes them, and records still queued at shutdown are
written to the log in full. How many wait, and for how long, is `backlog()`
(the metrics and GET /admin/v1/usage). Without Redis the record goes to the `gateway.usage`
log and the in-process totals, which keep the latest `keep` records.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
import redis.asyncio as aioredis
from pydantic import BaseModel, TypeAdapter

from gateway.background import cancel
from gateway.controlplane.limits import Admission, Limiter, limit_keys

logger = logging.getLogger("gateway.usage")


@dataclass(slots=True, kw_only=True)
class UsageRecord:
    """One request's usage. A plain dataclass, not a pydantic model: one is made for every
    request, and a model's validation is a measurable share of a request's CPU for fields
    the gateway fills itself. Records read back from Redis are validated
    (`usage_record`)."""

    record_id: str
    request_id: str
    account: str
    deployment: str
    model: str
    replica: str = ""
    endpoint: str
    status: str  # "ok", "aborted" (client went away) or "error"
    http_status: int
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    ttft_ms: float | None = None
    duration_ms: float = 0.0
    time: float  # unix seconds at the end
    metadata: dict[str, str] | None = None  # the request's `metadata`, as the client sent it


# Validates and converts what is read back (a Redis stream's fields are all text).
_RECORD = TypeAdapter(UsageRecord)
RECORD_FIELDS = tuple(field.name for field in dataclasses.fields(UsageRecord))


def usage_record(values: dict[str, Any]) -> UsageRecord:
    return _RECORD.validate_python(values)


def record_json(record: UsageRecord) -> str:
    return orjson.dumps(record).decode()


class UsageTotals(BaseModel):
    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    by_status: dict[str, int] = {}


    def add(self, record: UsageRecord) -> None:
        # Straight into the fields' storage: pydantic's __setattr__, a few times per request,
        # is a visible share of a request's CPU (and these ints need no validation).
        fields = self.__dict__
        fields["requests"] += 1
        fields["prompt_tokens"] += record.prompt_tokens
        fields["cached_tokens"] += record.cached_tokens
        fields["completion_tokens"] += record.completion_tokens
        self.by_status[record.status] = self.by_status.get(record.status, 0) + 1


def totals_of(records: Iterable[UsageRecord]) -> dict[str, UsageTotals]:
    totals: dict[str, UsageTotals] = {}
    for record in records:
        totals.setdefault(record.account, UsageTotals()).add(record)
    return totals


@dataclass(frozen=True)
class Backlog:
    """Usage records this gateway process has not yet written to Redis."""

    records: int = 0
    oldest_seconds: float = 0.0  # since the oldest waiting request ended


class Ledger(Protocol):
    def finish(self, record: UsageRecord, admission: Admission) -> None: ...

    def backlog(self) -> Backlog: ...

    @property
    def backlogged(self) -> bool:
        """Too many records wait for Redis: new requests are refused until they are in."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def totals(self) -> dict[str, UsageTotals]: ...


class LocalLedger:
    def __init__(self, limiter: Limiter, keep: int = 1000) -> None:
        self.limiter = limiter
        self.kept: deque[UsageRecord] = deque(maxlen=keep)  # the latest (tests look at them)
        self._totals: dict[str, UsageTotals] = {}

    def finish(self, record: UsageRecord, admission: Admission) -> None:
        self.limiter.settle(admission, record.prompt_tokens, record.completion_tokens)
        self.kept.append(record)
        totals = self._totals.get(record.account)
        if totals is None:
            totals = self._totals[record.account] = UsageTotals()
        totals.add(record)
        if logger.isEnabledFor(logging.INFO):
            logger.info("usage %s", record_json(record))

    @property
    def backlogged(self) -> bool:
        return False

    def backlog(self) -> Backlog:
        return Backlog()

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def totals(self) -> dict[str, UsageTotals]:
        return {account: total.model_copy(deep=True) for account, total in self._totals.items()}


# KEYS: done marker, prompt, generated (limits.py), usage stream, the account's totals
#       (hash), the set of accounts with totals
# ARGV: record id, bucket (-1: nothing reserved), prompt and generated: reserved, used;
#       limited (1/0), stream max length, account, status, cached tokens, the done
#       marker's lifetime (s), then the record's field/value pairs
FINISH_LUA = """
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[12]) then return 0 end
local bucket = tonumber(ARGV[2])
if bucket >= 0 then
  if redis.call('HEXISTS', KEYS[2], bucket) == 1 then
    redis.call('HINCRBY', KEYS[2], bucket, tonumber(ARGV[4]) - tonumber(ARGV[3]))
  end
  if redis.call('HEXISTS', KEYS[3], bucket) == 1 then
    redis.call('HINCRBY', KEYS[3], bucket, tonumber(ARGV[6]) - tonumber(ARGV[5]))
  end
elseif ARGV[7] == '1' then
  -- admitted while Redis was unreachable: count what it used, now
  local now = redis.call('TIME')[1]
  redis.call('HINCRBY', KEYS[2], now, ARGV[4])
  redis.call('HINCRBY', KEYS[3], now, ARGV[6])
  redis.call('EXPIRE', KEYS[2], 3600)
  redis.call('EXPIRE', KEYS[3], 3600)
end
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[8], '*', unpack(ARGV, 13))
redis.call('HINCRBY', KEYS[5], 'requests', 1)
redis.call('HINCRBY', KEYS[5], 'prompt_tokens', ARGV[4])
redis.call('HINCRBY', KEYS[5], 'cached_tokens', ARGV[11])
redis.call('HINCRBY', KEYS[5], 'completion_tokens', ARGV[6])
redis.call('HINCRBY', KEYS[5], 'status:' .. ARGV[10], 1)
redis.call('SADD', KEYS[6], ARGV[9])
return 1
"""


def _fields(record: UsageRecord) -> list[str]:
    fields: list[str] = []
    for key in RECORD_FIELDS:
        value = getattr(record, key)
        text = orjson.dumps(value).decode() if isinstance(value, dict) else str(value)
        fields += [key, "" if value is None else text]
    return fields


Pending = deque[tuple[UsageRecord, Admission]]


class RedisLedger:
    def __init__(self, client: aioredis.Redis, prefix: str = "fwgw:",
                 max_length: int = 10_000_000, max_pending: int = 100_000,
                 limiter: Limiter | None = None, batch: int = 256, marker_ttl: int = 3600,
                 on_backlog: Callable[[Backlog], None] = lambda backlog: None) -> None:
        self.redis = client
        self.prefix = prefix
        self.stream = f"{prefix}usage"
        self.max_length = max_length
        self.marker_ttl = marker_ttl  # how long a record's done marker stops a second count
        self.max_pending = max_pending
        self.limiter = limiter
        self.batch = batch
        self.on_backlog = on_backlog  # told after every batch sent or failed
        self._script = client.register_script(FINISH_LUA)
        # Never bounded by dropping: admission stops while they are too long (`backlogged`).
        self.holding: Pending = deque()  # their requests hold reservations in Redis: first
        self.others: Pending = deque()  # no reservation (no limits, or admitted without Redis)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def finish(self, record: UsageRecord, admission: Admission) -> None:
        if self.limiter is not None:  # in-process bookkeeping; Redis settles in the script
            self.limiter.settle(admission, record.prompt_tokens, record.completion_tokens)
        lane = self.holding if admission.bucket is not None else self.others
        lane.append((record, admission))
        self._wake.set()

    @property
    def pending(self) -> int:
        return len(self.holding) + len(self.others)

    @property
    def backlogged(self) -> bool:
        return self.pending >= self.max_pending

    def backlog(self) -> Backlog:
        ends = [lane[0][0].time for lane in (self.holding, self.others) if lane]
        return Backlog(self.pending, max(time.time() - min(ends), 0.0) if ends else 0.0)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._send(), name="usage-ledger")

    async def stop(self, timeout: float = 5.0) -> None:
        """Give queued records a few seconds to reach Redis, then stop."""
        deadline = time.monotonic() + timeout
        while self.pending and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.pending:
            logger.error("%d usage records not written to Redis (unreachable at shutdown); "
                         "here they are:", self.pending)
            for record, _ in itertools.chain(self.holding, self.others):
                logger.error("usage %s", record_json(record))
        await cancel(self._task)

    async def _send(self) -> None:
        failing = False
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self.pending:
                # Up to `batch` records, holding ones first, left queued until Redis has them.
                first = list(itertools.islice(self.holding, self.batch))
                then = list(itertools.islice(self.others, self.batch - len(first)))
                try:
                    async with self.redis.pipeline(transaction=False) as pipe:
                        for record, admission in first + then:
                            await self._append(record, admission, pipe)
                        await pipe.execute()
                except Exception as exc:  # Redis down, or anything else: keep the records
                    if not failing:
                        logger.warning("usage records queued until Redis takes them: %r", exc)
                    failing = True
                    self.on_backlog(self.backlog())
                    await asyncio.sleep(0.2)
                    continue
                failing = False
                for lane, sent in ((self.holding, len(first)), (self.others, len(then))):
                    for _ in range(sent):
                        lane.popleft()
                self.on_backlog(self.backlog())

    async def _append(self, record: UsageRecord, admission: Admission,
                      pipe: aioredis.client.Pipeline) -> None:
        """Queues the record's script in `pipe`: a batch half applied before a lost
        connection is sent again whole, and each record's SET NX counts it once."""
        bucket = admission.bucket if admission.bucket is not None else -1
        await self._script(
            keys=[f"{self.prefix}usage:done:{record.record_id}",
                  *limit_keys(self.prefix, record.account)[1:3], self.stream,
                  f"{self.prefix}usage:totals:{record.account}", f"{self.prefix}usage:accounts"],
            args=[record.record_id, bucket,
                  admission.prompt_reserved, record.prompt_tokens,
                  admission.generated_reserved, record.completion_tokens,
                  1 if admission.limited else 0, self.max_length, record.account,
                  record.status, record.cached_tokens, self.marker_ttl, *_fields(record)],
            client=pipe)

    async def totals(self) -> dict[str, UsageTotals]:
        return await read_totals(self.redis, self.prefix)


async def read_totals(client: aioredis.Redis, prefix: str) -> dict[str, UsageTotals]:
    """Every account's usage totals: one hash per account, never the whole stream."""
    accounts = sorted(_text(a) for a in await client.smembers(f"{prefix}usage:accounts"))
    async with client.pipeline(transaction=False) as pipe:
        for account in accounts:
            pipe.hgetall(f"{prefix}usage:totals:{account}")
        hashes = await pipe.execute()
    totals: dict[str, UsageTotals] = {}
    for account, fields in zip(accounts, hashes, strict=True):
        values = {_text(k): int(v) for k, v in fields.items()}
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
            values: dict[str, Any] = {_text(k): _text(v) for k, v in fields.items()}
            for optional in ("ttft_ms", "metadata"):
                if values.get(optional) == "":
                    values.pop(optional)
            if "metadata" in values:
                values["metadata"] = orjson.loads(values["metadata"])
            records.append(usage_record(values))
        if len(entries) < page:
            return records
        start = "(" + _text(entries[-1][0])


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
