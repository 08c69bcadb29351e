"""Each gateway's batch runner: it takes groups of lines from the active jobs (jobs.py), in
turn across jobs, and runs every line as an ordinary request through the data plane's one
path (dataplane/request.serve): the same validation, translation, limits, queue (in its
batch band), usage record, metrics and trace as a client's request. A line is a `LineClient`
there; its usage record's id is the line's own, so that a line run again after its gateway
died is counted once.

A line is confirmed (its result counted, jobs.LINE_DONE_LUA) only after its usage record is
in Redis and its result on the volume: a gateway that dies before that loses nothing, and
another runs the line again. The runner keeps at most `batch_concurrency` lines running;
while it runs a group it tells Redis so every `batch_claim_timeout` / 3 seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import random
import secrets
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any

import orjson

from gateway.api import InferenceApi
from gateway.background import cancel, every, stop_if_cancelled
from gateway.batch.engine import Engine
from gateway.batch.jobs import Job
from gateway.batch.lines import Line, Result
from gateway.config import Settings
from gateway.dataplane.parts import Gateway
from gateway.dataplane.request import serve
from gateway.errors import GatewayError
from gateway.server.client import BatchLine, Headers, too_large

logger = logging.getLogger("gateway.batch")
POLL = 0.2  # seconds between looks for lines when there were none
SWEEP = 2.0  # seconds between looks for jobs to expire or close (engine.sweep)
RETRY_WITHIN = 60  # a 429 whose retry-after is longer (a budget) ends the line


class LineClient:
    """One batch line as the data plane's client: its body is the line's, its reply is
    kept for the output file; it never leaves."""

    gone = False

    def __init__(self, path: str, body: bytes, line: BatchLine, request_id: str) -> None:
        self.path, self.body, self.batch, self.request_id = path, body, line, request_id
        self.headers = {"content-type": "application/json", "x-request-id": request_id}
        self.responded = False
        self.status = 0
        self.reply_headers: Headers = []
        self.reply = bytearray()

    async def read_body(self, settings: Settings) -> bytes:
        if len(self.body) > settings.max_body_bytes:
            raise too_large(settings)
        return self.body

    def watch(self) -> None:
        return None

    def unwatch(self) -> None:
        return None

    async def whole(self, status: int, headers: Headers, body: bytes) -> None:
        self.status, self.reply_headers, self.responded = status, headers, True
        self.reply += body

    async def begin(self, status: int, headers: Headers) -> None:
        self.status, self.reply_headers, self.responded = status, headers, True

    async def part(self, body: bytes) -> None:
        self.reply += body

    async def last(self, body: bytes) -> None:
        self.reply += body

    def retry_after(self) -> float | None:
        """How long to wait before the line goes again; None: it must not (a 429 that came
        after admission has its usage record under the line's id: `x-should-retry`)."""
        wait = 1.0
        for name, value in self.reply_headers:
            if name.lower() == b"x-should-retry" and value == b"false":
                return None
            if name.lower() == b"retry-after" and value.isdigit():
                wait = max(float(value), 0.5)
        return wait


def line_record_id(job: Job, number: int) -> str:
    """The same on every run of the line (32 hex digits, as every record id)."""
    return hashlib.blake2b(f"{job.account}\0{job.id}\0{job.spec['nonce']}\0{number}".encode(),
                           digest_size=16).hexdigest()


class Runner:
    def __init__(self, gateway: Gateway, engine: Engine,
                 apis: Mapping[str, InferenceApi[Any]], prefix: str) -> None:
        self.gateway, self.engine, self.jobs = gateway, engine, engine.jobs
        self.apis, self.prefix = apis, prefix  # by path ("/chat/completions")
        settings = gateway.settings
        self.concurrency = settings.batch_concurrency
        self.claim_ms = int(settings.batch_claim_timeout * 1000)
        self.consumer = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.slots = asyncio.Semaphore(self.concurrency)
        self.taken = 0  # lines this gateway holds that may run now, not yet confirmed
        self.held: dict[str, set[str]] = {}  # job key -> entries held
        self.groups: set[asyncio.Task[None]] = set()
        self.tasks: list[asyncio.Task[None]] = []
        self.room = asyncio.Event()

    def start(self) -> None:
        interval = self.claim_ms / 3000
        self.tasks = [asyncio.create_task(self._take(), name="batch runner"),
                      every(interval, self._hold, "batch claims", logger),
                      every(SWEEP, self._sweep, "batch sweep", logger)]

    async def stop(self, grace: float = 10.0) -> None:
        """Take no more lines; give those running `grace` seconds, then stop them (their
        groups are taken by another gateway)."""
        for task in self.tasks:
            await cancel(task)
        if self.groups:
            await asyncio.wait(self.groups, timeout=grace)
        for task in list(self.groups):
            await cancel(task)

    async def _take(self) -> None:
        while True:
            took = False
            try:
                active = await self.jobs.active()
                random.shuffle(active)  # in turn across jobs, whichever gateway
                for account, job_id in active:
                    if self.taken >= self.concurrency:
                        break
                    job = await self.jobs.find(account, job_id)
                    if job is None or job.status != "in_progress":
                        continue
                    if time.time() > job.spec["expires_at"]:  # no line starts past it
                        await self.engine.sweep(job)
                        continue
                    claimed = await self.jobs.claim(job, self.consumer, self.claim_ms)
                    if claimed is None:
                        continue
                    took = True
                    self._run(job, *claimed)
            except Exception:
                logger.exception("batch runner: looking for lines failed")
            stop_if_cancelled()
            if self.taken >= self.concurrency:
                self.room.clear()
                await self.room.wait()
            elif not took:
                await asyncio.sleep(POLL)

    def _run(self, job: Job, entry: str, group: list[list[int]]) -> None:
        # The lines that may run now take a place each: the group's first, then (once it
        # ended) the others; another group is taken while a first line runs alone.
        self.taken += 1
        left = [1]  # the group's places not yet given back
        self.held.setdefault(job.key, set()).add(entry)

        def places(count: int) -> None:  # +n: lines ready to run; -1: a line ended
            left[0] += count
            self.taken += count
            if count < 0:
                self.room.set()
        task = asyncio.create_task(self._group(job, entry, group, places),
                                   name=f"batch {job.id}")
        self.groups.add(task)

        def ended(done: asyncio.Task[None]) -> None:
            self.groups.discard(done)
            self.taken -= left[0]
            self.held.get(job.key, set()).discard(entry)
            self.room.set()
        task.add_done_callback(ended)

    async def _group(self, job: Job, entry: str, group: list[list[int]],
                     places: Callable[[int], None]) -> None:
        """The group's first line alone (its prefix is then cached), then the others; as
        each line ends, this gateway may take more (`places`)."""
        async def line(place: list[int]) -> int:
            try:
                return await self._line(current, *place)
            finally:
                places(-1)
        try:
            found = await self.jobs.find(job.account, job.id)
            current = found or job
            if found is not None and found.status == "in_progress":
                first, *rest = group
                left: list[int | BaseException] = [await line(first)]
                places(len(rest))
                # Every line runs to its end even if another fails (Redis, the volume): the
                # group is then left unacknowledged, and its lines not counted run again.
                left += await asyncio.gather(*(line(place) for place in rest),
                                             return_exceptions=True)
                failed = [e for e in left if isinstance(e, BaseException)]
                if failed:
                    raise failed[0]
                if 0 in left:  # the job's last line: this gateway writes its output
                    await self.engine.finalize(current)
            await self.jobs.acknowledge(job, entry)
        except asyncio.CancelledError:
            raise
        except Exception:  # Redis or the volume failed: the group is run again elsewhere
            logger.exception("batch job %s: a group of lines failed; it will run again",
                             job.id)

    async def _line(self, job: Job, number: int, offset: int, length: int) -> int:
        """Run one line, write its result, count it -> lines left in the job (-1: it was
        counted before)."""
        # A line holds its place from its first look in Redis to its confirmation: at
        # most batch_concurrency lines are looked up, read, run or written at once.
        async with self.slots:
            if await self.jobs.is_done(job, number):
                return -1
            line = await asyncio.to_thread(self.engine.line, job, number, offset, length)
            result = await self.request(job, line)
            record_id = line_record_id(job, number)
            while self.gateway.ledger.unwritten(record_id):  # the usage record first
                await asyncio.sleep(0.02)
            await asyncio.to_thread(self.engine.append, job, self.consumer, [result])
            return await self.jobs.line_done(job, number, result.ok, result.usage())

    async def request(self, job: Job, line: Line) -> Result:
        """The line through the data plane, as a client's request; a line refused for the
        account's per-minute limits (429, nothing done) waits and goes again. One refused
        for longer (a spent budget: until its window ends) is an error line, so that it
        holds none of the runner's places meanwhile."""
        request_id = f"batch-{job.id}-{line.number}"
        api = self.apis.get(line.path)
        if line.body is None or api is None:
            return Result(line.number, line.custom_id, request_id, 0,
                          error=("invalid_request", line.error or "unknown endpoint"))
        body = orjson.dumps(line.body)
        while True:
            while self.gateway.ledger.backlogged:  # usage cannot be written: wait for it
                await asyncio.sleep(1.0)
            client = LineClient(self.prefix + line.path, body,
                                BatchLine(job.id, job.account, line_record_id(job, line.number)),
                                request_id)
            await serve(self.gateway, api, client)
            wait = client.retry_after()
            if client.status != 429 or wait is None or wait > RETRY_WITHIN:
                break
            await asyncio.sleep(wait * random.uniform(1.0, 1.5))
        try:
            reply = orjson.loads(bytes(client.reply)) if client.reply else None
        except orjson.JSONDecodeError:
            reply = {"error": {"message": bytes(client.reply[:500]).decode(errors="replace")}}
        return Result(line.number, line.custom_id, request_id, client.status, reply)

    async def _hold(self) -> None:
        for job_key, entries in list(self.held.items()):
            if entries:
                await self.jobs.hold(job_key, self.consumer, sorted(entries))
            else:
                self.held.pop(job_key, None)

    async def _sweep(self) -> None:
        for account, job_id in await self.jobs.active():
            job = await self.jobs.find(account, job_id)
            if job is not None:
                with contextlib.suppress(GatewayError):
                    await self.engine.sweep(job)

