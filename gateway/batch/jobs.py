"""Batch jobs' state in Redis, shared by every gateway replica (the bulk instance: nothing
here has a TTL, so nothing is evicted; a full instance refuses new jobs).

Per job (`<prefix>batch:`, then `<account>:<id>`: another account's job is not found):
- `job:` a hash: what the job was made with (`spec`, JSON) and what changes (status, the
  counters, the output files' ids, when each status began);
- `lines:` a stream of the groups of lines to run (lines.groups), read by every gateway
  through the consumer group `runners`: an entry is a gateway's until it acknowledges it,
  and one a dead gateway held is claimed by another after `batch_claim_timeout` (XAUTOCLAIM);
  a stream and a consumer group, because Redis then keeps what is taken and by whom, and
  hands over what a dead consumer held, with no lock of ours;
- `done:` line number -> "1" (succeeded) or "0" (failed): a line's result counts once
  (LINE_DONE_LUA), however many gateways ran it.
`active` holds the jobs not finished (every gateway's runner reads it), `jobs:<account>` an
account's jobs by creation time.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from gateway.batch.files import ID, page

GROUP = "runners"
KEPT = 10_000  # jobs one account keeps (the oldest finished ones are forgotten)
RUNNING = ("in_progress", "cancelling", "expiring")  # lines may still be running
FINAL = ("completed", "failed", "cancelled", "expired")

# KEYS: done, job; ARGV: number, ok (1/0), prompt, cached, completion tokens
# -> lines left, or -1 when the line was counted already, -2 when the job is closed
LINE_DONE_LUA = """
local status = redis.call('HGET', KEYS[2], 'status')
if status ~= 'in_progress' and status ~= 'cancelling' and status ~= 'expiring' then
  return -2
end
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return -1 end
redis.call('HINCRBY', KEYS[2], ARGV[2] == '1' and 'completed' or 'failed', 1)
redis.call('HINCRBY', KEYS[2], 'prompt_tokens', ARGV[3])
redis.call('HINCRBY', KEYS[2], 'cached_tokens', ARGV[4])
redis.call('HINCRBY', KEYS[2], 'completion_tokens', ARGV[5])
local counts = redis.call('HMGET', KEYS[2], 'total', 'completed', 'failed')
return tonumber(counts[1]) - tonumber(counts[2]) - tonumber(counts[3])
"""

# KEYS: job; ARGV: from (comma separated), to, time -> 1 when the status changed
MOVE_LUA = """
local status = redis.call('HGET', KEYS[1], 'status')
for s in string.gmatch(ARGV[1], '[^,]+') do
  if s == status then
    redis.call('HSET', KEYS[1], 'status', ARGV[2], ARGV[2] .. '_at', ARGV[3])
    return 1
  end
end
return 0
"""


@dataclass
class Job:
    """A job as stored: `spec` is what it was made with, the rest what changes."""

    id: str
    account: str
    spec: dict[str, Any]  # shape, endpoint / model + parameters, input, metadata, ...
    status: str = "in_progress"
    total: int = 0
    completed: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    output_file: str | None = None
    error_file: str | None = None
    errors: list[str] = field(default_factory=list)  # why the file could not be a job
    times: dict[str, int] = field(default_factory=dict)  # status -> when it began

    @property
    def key(self) -> str:
        return f"{self.account}:{self.id}"

    @property
    def left(self) -> int:
        return self.total - self.completed - self.failed


def new_job_id(shape: str) -> str:
    return ("batch_" if shape == "openai" else "") + secrets.token_hex(12)


class Jobs:
    def __init__(self, client: aioredis.Redis, prefix: str) -> None:
        self.client = client
        self.prefix = f"{prefix}batch:"
        self._line_done = client.register_script(LINE_DONE_LUA)
        self._move = client.register_script(MOVE_LUA)

    def _k(self, kind: str, key: str) -> str:
        return f"{self.prefix}{kind}:{key}"

    async def create(self, job: Job, groups: list[list[tuple[int, int, int]]],
                     refused: dict[int, bool]) -> None:
        """Store the job with its groups of lines ((number, offset, length) each) and the
        lines already decided (`refused`: number -> ok) counted; then it is active."""
        now = int(time.time())
        job.spec.setdefault("nonce", secrets.token_hex(8))  # the lines' record ids: runner.py
        job.times.setdefault("created", now)
        if job.status == "in_progress":
            job.times.setdefault("in_progress", now)
        stream = self._k("lines", job.key)
        if groups:
            try:
                await self.client.xgroup_create(stream, GROUP, id="0", mkstream=True)
            except ResponseError as exc:  # made already (a retried creation)
                if "BUSYGROUP" not in str(exc):
                    raise
        async with self.client.pipeline(transaction=False) as pipe:
            for group in groups:
                pipe.xadd(stream, {"lines": orjson.dumps(group)})
            if refused:
                pipe.hset(self._k("done", job.key),
                          mapping={str(n): "1" if ok else "0" for n, ok in refused.items()})
            await pipe.execute()
        fields: dict[str, Any] = {
            "spec": orjson.dumps(job.spec), "status": job.status, "total": job.total,
            "completed": job.completed, "failed": job.failed, "prompt_tokens": 0,
            "cached_tokens": 0, "completion_tokens": 0,
            "errors": orjson.dumps(job.errors)}
        fields.update({f"{status}_at": at for status, at in job.times.items()})
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(self._k("job", job.key), mapping=fields)  # type: ignore[arg-type]
            pipe.zadd(self._k("jobs", job.account), {job.id: job.times["created"]})
            if job.status in RUNNING:
                pipe.sadd(self._k("active", ""), job.key)
            await pipe.execute()
        await self._trim(job.account)

    async def _trim(self, account: str) -> None:
        """An account keeps its newest KEPT jobs: the oldest finished ones are forgotten."""
        index = self._k("jobs", account)
        excess = await self.client.zcard(index) - KEPT
        if excess <= 0:
            return
        oldest: Any = await self.client.zrange(index, 0, excess - 1)
        for raw in oldest:
            job = await self.find(account, raw.decode())
            if job is not None and job.status in FINAL:
                await self.forget(job)

    async def find(self, account: str, job_id: str) -> Job | None:
        if not ID.fullmatch(job_id):
            return None
        raw: Any = await self.client.hgetall(self._k("job", f"{account}:{job_id}"))
        if not raw:
            return None
        values = {k.decode(): v.decode() for k, v in raw.items()}
        counts = {name: int(values.get(name, 0)) for name in (
            "total", "completed", "failed", "prompt_tokens", "cached_tokens",
            "completion_tokens")}
        return Job(job_id, account, orjson.loads(values["spec"]), values["status"],
                   output_file=values.get("output_file") or None,
                   error_file=values.get("error_file") or None,
                   errors=orjson.loads(values.get("errors", "[]")),
                   times={k[:-3]: int(v) for k, v in values.items() if k.endswith("_at")},
                   **counts)

    async def listed(self, account: str, limit: int = 10000, after: str | None = None
                     ) -> list[Job]:
        return await page(self.client, self._k("jobs", account),
                          lambda job_id: self.find(account, job_id), limit, after)

    async def running(self, account: str) -> int:
        """The account's jobs not finished."""
        members: Any = await self.client.smembers(self._k("active", ""))
        return sum(m.decode().rpartition(":")[0] == account for m in members)

    async def active(self) -> list[tuple[str, str]]:
        """(account, job id) of every job not finished."""
        members: Any = await self.client.smembers(self._k("active", ""))
        found: list[tuple[str, str]] = []
        for member in members:
            account, _, job_id = member.decode().rpartition(":")
            found.append((account, job_id))
        return found

    async def move(self, job: Job, sources: tuple[str, ...], to: str) -> bool:
        """The job's status from one of `sources` to `to` (atomically; False when it was
        in none of them)."""
        return bool(await self._move(keys=[self._k("job", job.key)],
                                     args=[",".join(sources), to, int(time.time())]))

    async def claim(self, job: Job, consumer: str, idle_ms: int
                    ) -> tuple[str, list[list[int]]] | None:
        """A group of the job's lines for this gateway: one a dead gateway held past
        `idle_ms`, else a new one; None when there is none."""
        stream = self._k("lines", job.key)
        try:
            claimed: Any = await self.client.xautoclaim(stream, GROUP, consumer, idle_ms,
                                                          "0-0", count=1)
            entries = claimed[1]
            if not entries:
                found: Any = await self.client.xreadgroup(GROUP, consumer, {stream: ">"}, count=1)
                entries = found[0][1] if found else []
        except ResponseError as exc:  # the job was finished and its stream removed
            if "NOGROUP" in str(exc):
                return None
            raise
        for entry_id, fields in entries:
            if fields:  # (an entry trimmed away comes back empty)
                return entry_id.decode(), orjson.loads(fields[b"lines"])
        return None

    async def hold(self, job_key: str, consumer: str, entry_ids: list[str]) -> None:
        """Still running these entries: their idle time starts again (no one claims them)."""
        if entry_ids:
            await self.client.xclaim(self._k("lines", job_key), GROUP, consumer, 0,
                                     list[Any](entry_ids), justid=True)

    async def acknowledge(self, job: Job, entry_id: str) -> None:
        await self.client.xack(self._k("lines", job.key), GROUP, entry_id)

    async def in_flight(self, job: Job) -> int:
        """Entries taken and not acknowledged."""
        try:
            summary = await self.client.xpending(self._k("lines", job.key), GROUP)
        except ResponseError:
            return 0
        return int(summary["pending"])

    async def drop_idle(self, job: Job, idle_ms: int) -> None:
        """A cancelled or expiring job's lines that gateways took and stopped confirming
        (they died): no one runs them now, so they no longer hold the job's end."""
        stream = self._k("lines", job.key)
        try:
            ids: Any = await self.client.xautoclaim(stream, GROUP, "sweep", idle_ms, "0-0",
                                                    count=1000, justid=True)
        except ResponseError:
            return
        if ids:  # (redis-py gives just the ids with justid)
            await self.client.xack(stream, GROUP, *ids)

    async def is_done(self, job: Job, number: int) -> bool:
        return bool(await self.client.hexists(self._k("done", job.key), str(number)))

    async def done(self, job: Job) -> dict[int, bool]:
        raw: Any = await self.client.hgetall(self._k("done", job.key))
        return {int(k): v == b"1" for k, v in raw.items()}

    async def line_done(self, job: Job, number: int, ok: bool,
                        tokens: tuple[int, int, int]) -> int:
        """Count the line's result once -> lines left (-1: counted already; -2: the job is
        closed)."""
        return int(await self._line_done(keys=[self._k("done", job.key),
                                               self._k("job", job.key)],
                                         args=[number, "1" if ok else "0", *tokens]))

    async def lock(self, job: Job, seconds: int) -> bool:
        """The right to finalize the job for `seconds` (one gateway at a time)."""
        return bool(await self.client.set(self._k("closing", job.key), "1", nx=True,
                                          ex=seconds))

    async def close(self, job: Job, status: str, output: str | None,
                    error: str | None) -> None:
        """The job's end: its status and output files; its lines and counts removed."""
        fields: dict[str, Any] = {"status": status, f"{status}_at": int(time.time())}
        fields.update({"output_file": output or "", "error_file": error or ""})
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(self._k("job", job.key), mapping=fields)  # type: ignore[arg-type]
            pipe.srem(self._k("active", ""), job.key)
            pipe.delete(self._k("lines", job.key), self._k("done", job.key),
                        self._k("closing", job.key))
            await pipe.execute()

    async def forget(self, job: Job) -> None:
        """A finished job deleted (Fireworks' DELETE)."""
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.delete(self._k("job", job.key))
            pipe.zrem(self._k("jobs", job.account), job.id)
            await pipe.execute()
