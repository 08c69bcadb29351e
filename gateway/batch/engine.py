"""The one batch engine under both APIs (OpenAI's batches, Fireworks' batch inference jobs):
a job made from a stored file, its lines' results kept on the volume, its end written as
output files. The lines themselves run in runner.py.

A job's folder on the volume (beside its account's files) holds a link to its input file (a
second name for the same bytes: the file may be deleted while the job runs) and one results
file per gateway that ran its lines, appended to line by line. A line whose gateway died
after writing its result and before counting it (jobs.py) is run again elsewhere, so a
result may be written twice: the output keeps the first, and only lines counted in Redis.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import Any

import orjson

from gateway.batch import lines as batch_lines
from gateway.batch.files import FileStore, StoredFile
from gateway.batch.jobs import FINAL, RUNNING, Job, Jobs
from gateway.batch.lines import FileRefused, Line, Result, Spec
from gateway.errors import GatewayError

logger = logging.getLogger("gateway.batch")
WINDOW = 24 * 3600  # the completion window, the only one OpenAI offers ("24h")
CLOSING_LOCK = 120  # seconds one gateway has to write a job's output


class Engine:
    def __init__(self, jobs: Jobs, files: FileStore, *, max_lines: int, max_jobs: int,
                 prefix_chars: int, claim_ms: int = 60_000) -> None:
        self.claim_ms = claim_ms  # a line not confirmed for this long: its gateway died
        self.jobs, self.files = jobs, files
        self.max_lines, self.max_jobs = max_lines, max_jobs
        self.prefix_chars = prefix_chars

    def folder(self, job: Job) -> Path:
        return self.files.folder(job.account) / ".jobs" / job.id

    def input(self, job: Job) -> Path:
        return self.folder(job) / "input.jsonl"

    @staticmethod
    def spec(job: Job) -> Spec:
        return Spec(job.spec.get("endpoint"), job.spec.get("model"),
                    job.spec.get("parameters") or {})

    async def create(self, job: Job, source: StoredFile,
                     done_before: dict[str, dict[str, Any]] | None = None) -> Job:
        """Make the job from its input file: every line checked (a bad one is an error line
        at once), the rest grouped and queued for the runners. `done_before`: custom_id ->
        a result of an earlier job this one continues (those lines are not run again)."""
        if await self.jobs.running(job.account) >= self.max_jobs:
            raise GatewayError(429, f"The account has {self.max_jobs} batch jobs running; "
                                    "wait for one to finish")
        data = await asyncio.to_thread(self.files.read, source)
        try:
            lines, spans = batch_lines.read(data, self.spec(job), self.max_lines)
        except FileRefused as exc:
            job.status, job.errors = "failed", [str(exc)]
            job.times["failed"] = int(time.time())
            await self.jobs.create(job, [], {})
            return job
        try:
            self.folder(job).mkdir(parents=True)  # (a job's id is new, or being made)
            os.link(self.files.path(source), self.input(job))
        except FileExistsError:  # the same id made at once by another request
            raise GatewayError(409, f"A job {job.id} is being made") from None
        except FileNotFoundError:  # the file was deleted meanwhile
            raise GatewayError(404, f"No such file: {source.id}") from None
        decided: dict[int, bool] = {}
        results: list[Result] = []
        for line in lines:
            earlier = (done_before or {}).get(line.custom_id)
            if line.body is None:
                results.append(batch_lines.refused(line))
            elif earlier is not None:
                results.append(Result(line.number, line.custom_id, "", 200, earlier))
            else:
                continue
            decided[line.number] = results[-1].ok
        self.append(job, "created", results)
        runnable = [line for line in lines if line.number not in decided]
        groups = [[(n, *spans[n]) for n in group]
                  for group in batch_lines.groups(runnable, self.prefix_chars)]
        job.total = len(lines)
        job.completed = sum(decided.values())
        job.failed = len(decided) - job.completed
        await self.jobs.create(job, groups, decided)
        if not groups:  # nothing to run: it ends at once
            await self.finalize(job)
        return job

    def line(self, job: Job, number: int, offset: int, length: int) -> Line:
        """A line of the job's input, read again (checked when the job was made)."""
        with self.input(job).open("rb") as source:
            source.seek(offset)
            raw = source.read(length)
        return batch_lines.read_one(raw, number, self.spec(job))

    def append(self, job: Job, writer: str, results: list[Result]) -> None:
        """Results, appended to this writer's file in the job's folder, in the system's
        hands before the line is counted: a gateway that dies loses none of them. (Not
        fsynced line by line: on this project's disks that made a job I/O-bound. A node
        that loses power may lose the last seconds' results: `results` then says so.)"""
        if not results:
            return
        payload = b"".join(orjson.dumps(r.__dict__) + b"\n" for r in results)
        with (self.folder(job) / f"results-{writer}.jsonl").open("ab") as out:
            out.write(payload)

    def results(self, job: Job, counted: dict[int, bool]) -> dict[int, Result]:
        """The first result written for each counted line."""
        found: dict[int, Result] = {}
        for path in sorted(self.folder(job).glob("results-*.jsonl")):
            for raw in path.read_bytes().splitlines():
                try:
                    result = Result(**orjson.loads(raw))
                except (orjson.JSONDecodeError, TypeError):
                    continue  # a line cut short by a gateway that died writing it
                if result.number in counted and result.number not in found:
                    found[result.number] = result
        for number in counted.keys() - found.keys():  # counted, its result lost with a node
            found[number] = Result(number, "", "", 0, error=(
                "result_lost", "The line ran, but its result was lost with the machine "
                               "that wrote it; send it again"))
        return found

    async def cancel(self, job: Job) -> Job:
        """No new line starts; those running finish and are kept (the sweep closes it)."""
        await self.jobs.move(job, ("in_progress",), "cancelling")
        return await self.jobs.find(job.account, job.id) or job

    async def sweep(self, job: Job) -> None:
        """A job's due changes (each gateway, now and then): expired past its window;
        closed when its lines are done, or cancelled or expired and none runs."""
        if job.status == "in_progress" and time.time() > job.spec["expires_at"]:
            await self.jobs.move(job, ("in_progress",), "expiring")
            job.status = "expiring"
        if job.status in ("cancelling", "expiring"):
            await self.jobs.drop_idle(job, self.claim_ms)  # held by gateways that died
        if job.status == "finalizing" or (job.status in RUNNING and (
                job.left <= 0 or (job.status != "in_progress"
                                  and not await self.jobs.in_flight(job)))):
            await self.finalize(job)

    async def finalize(self, job: Job) -> None:
        """Write the job's output (one gateway at a time; again by another if it dies)."""
        if not await self.jobs.lock(job, CLOSING_LOCK):
            return
        current = await self.jobs.find(job.account, job.id)
        if current is None or current.status in FINAL:
            return
        end = {"in_progress": "completed", "cancelling": "cancelled",
               "expiring": "expired"}.get(current.status, "completed")
        if end == "completed":
            await self.jobs.move(current, ("in_progress",), "finalizing")
        counted = await self.jobs.done(current)
        results = await asyncio.to_thread(self.results, current, counted)
        if end == "expired":  # the lines never run are errors, as OpenAI writes them
            data = await asyncio.to_thread(self.input(current).read_bytes)
            for line in batch_lines.read(data, self.spec(current), self.max_lines)[0]:
                if line.number not in results:
                    results[line.number] = Result(
                        line.number, line.custom_id, "", 0,
                        error=("batch_expired", "This request could not be executed "
                                                "before the completion window expired."))
        ordered = [results[n] for n in sorted(results)]
        output, error = await self.write_output(current, ordered)
        await self.jobs.close(current, end, output, error)
        await asyncio.to_thread(self._remove, current)
        logger.info("batch job %s of %s %s: %d lines, %d failed", current.id,
                    current.account, end, current.total, current.failed)

    async def write_output(self, job: Job, results: list[Result]
                           ) -> tuple[str | None, str | None]:
        """The output files, in the job's shape -> their ids."""
        account = job.account
        if job.spec["shape"] == "fireworks":
            data = b"".join(orjson.dumps(batch_lines.dataset_line(r)) + b"\n"
                            for r in results)
            name = job.spec["output_dataset"]
            stored = await self.files.write(account, "dataset", f"{name}.jsonl", data, name)
            return stored.id, None
        good = b"".join(orjson.dumps(batch_lines.openai_line(r)) + b"\n"
                        for r in results if r.ok)
        bad = b"".join(orjson.dumps(batch_lines.openai_line(r)) + b"\n"
                       for r in results if not r.ok)
        output = await self.files.write(account, "batch_output", f"{job.id}_output.jsonl",
                                        good, f"file-{job.id}-output") if good else None
        error = await self.files.write(account, "batch_output", f"{job.id}_error.jsonl",
                                       bad, f"file-{job.id}-error") if bad else None
        return (output.id if output else None), (error.id if error else None)

    def _remove(self, job: Job) -> None:
        folder = self.folder(job)
        for path in folder.iterdir():
            path.unlink(missing_ok=True)
        folder.rmdir()
