"""How a job's lines run (runner.py) over scripted workers and a real redis-server: an account's
limits make a job wait (never fail a line), cancel and expiry keep what finished, and lines
that share a prompt's head run after their group's first."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from gateway.batch import openai_routes
from gateway.batch.runner import LineClient
from gateway.server.client import BatchLine
from tests.redis_server import RedisServer
from tests.unit.batch.scene import (
    answer,
    auth,
    chat_line,
    content,
    finished,
    harness,
    jsonl,
    new_prefix,
    upload,
    usage,
)
from tests.unit.fake_worker import Pause, Stream


def slow(seconds: float, running: list[int] | None = None) -> Any:
    """`answer`, each after `seconds`."""
    def handler(request: httpx.Request) -> httpx.Response:
        quick = answer(request)
        return httpx.Response(200, headers={"content-type": "application/json"},
                              stream=Stream([Pause(seconds), quick.content]))
    return handler


async def create(http: httpx.AsyncClient, lines: list[dict[str, Any]]) -> str:
    file_id = await upload(http, jsonl(lines))
    made = await http.post("/v1/batches", headers=auth(), json={
        "input_file_id": file_id, "endpoint": "/v1/chat/completions",
        "completion_window": "24h"})
    assert made.status_code == 200, made.text
    return str(made.json()["id"])


async def test_an_accounts_limits_make_a_job_wait_not_fail(
        tmp_path: Path, redis_server: RedisServer) -> None:
    prefix = new_prefix()
    h = harness(tmp_path, redis_server, prefix, slow(0.05),
                accounts={"fireworks": {"limits": {"concurrent_requests": 1}}},
                batch_concurrency=4)
    async with h.running() as http:
        batch = await finished(http, await create(
            http, [chat_line(f"c{i}", f"q{i}") for i in range(6)]))
        name = h.gateway.store.current.data.deployments[0].name
        limited = h.gateway.metrics.rate_limited.labels(name, "concurrent_requests")._value.get()
    assert batch["request_counts"] == {"total": 6, "completed": 6, "failed": 0}
    assert limited > 0  # lines were refused by the limit, and went again
    records = await usage(redis_server, prefix)
    assert len(records) == 6 and all(r.status == "ok" for r in records)


async def test_a_spent_budget_ends_lines_instead_of_holding_the_runner(
        tmp_path: Path, redis_server: RedisServer) -> None:
    """A budget's 429 lasts until its window ends: the line is an error line at once, and
    the runner's places go to other accounts' lines meanwhile."""
    prefix = new_prefix()
    spent = {"budgets": [{"name": "daily", "window": "day", "tokens": 1}]}
    h = harness(tmp_path, redis_server, prefix, slow(0.01), accounts={"fireworks": spent},
                batch_concurrency=2)
    async with h.running() as http:
        batch = await asyncio.wait_for(finished(http, await create(
            http, [chat_line(f"c{i}", f"q{i}") for i in range(4)])), 30)
        errors = await content(http, batch["error_file_id"])
    assert batch["request_counts"] == {"total": 4, "completed": 0, "failed": 4}
    assert {line["response"]["status_code"] for line in errors} == {429}


async def test_a_cancelled_job_keeps_what_finished_and_runs_nothing_more(
        tmp_path: Path, redis_server: RedisServer) -> None:
    h = harness(tmp_path, redis_server, new_prefix(), slow(0.3), batch_concurrency=2,
                batch_prefix_chars=0)
    async with h.running() as http:
        batch_id = await create(http, [chat_line(f"c{i}", f"q{i}") for i in range(20)])
        await asyncio.sleep(0.45)  # two lines done, two running
        cancelled = await http.post(f"/v1/batches/{batch_id}/cancel", headers=auth())
        assert cancelled.json()["status"] == "cancelling"
        batch = await finished(http, batch_id)
        output = await content(http, batch["output_file_id"])
        sent = len(h.workers.served.requests)  # type: ignore[union-attr]
        await asyncio.sleep(0.5)
        assert len(h.workers.served.requests) == sent  # type: ignore[union-attr]
    assert batch["status"] == "cancelled" and batch["cancelled_at"] is not None
    assert 2 <= len(output) == batch["request_counts"]["completed"] == sent <= 6
    assert batch["error_file_id"] is None  # lines never run are not errors of a cancel


async def test_an_expired_job_writes_the_lines_it_did_not_run_as_expired(
        tmp_path: Path, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(openai_routes, "WINDOW", 2)  # (1 s: no line done on a busy machine)
    h = harness(tmp_path, redis_server, new_prefix(), slow(0.4), batch_concurrency=1,
                batch_prefix_chars=0)
    async with h.running() as http:
        batch = await finished(http, await create(
            http, [chat_line(f"c{i}", f"q{i}") for i in range(10)]))
        output = await content(http, batch["output_file_id"])
        errors = await content(http, batch["error_file_id"])
    assert batch["status"] == "expired"
    assert len(output) + len(errors) == 10 and 1 <= len(output) <= 6
    assert {e["error"]["code"] for e in errors} == {"batch_expired"}


async def test_lines_sharing_a_prompts_head_run_after_their_groups_first(
        tmp_path: Path, redis_server: RedisServer) -> None:
    document = "The lighthouse keeper's log. " * 30
    lines = []
    for i in range(6):
        line = chat_line(f"c{i}", f"question {i}")
        line["body"]["messages"].insert(0, {"role": "system",
                                            "content": document if i % 2 else "short"})
        lines.append(line)
    h = harness(tmp_path, redis_server, new_prefix(), slow(0.1), batch_concurrency=8,
                batch_prefix_chars=200)
    async with h.running() as http:
        batch = await finished(http, await create(http, lines))
    assert batch["request_counts"]["completed"] == 6
    arrivals = [orjson.loads(r.content)["messages"][-1]["content"]
                for r in h.workers.served.requests]  # type: ignore[union-attr]
    # The document's group: question 1 first, alone; 3 and 5 after it answered (0.1 s),
    # while the short prompts (0, 2, 4) each run alone at once.
    assert arrivals.index("question 1") < arrivals.index("question 3")
    assert arrivals.index("question 1") < arrivals.index("question 5")
    assert set(arrivals[:4]) == {"question 0", "question 1", "question 2", "question 4"}


async def test_a_cancelled_job_does_not_wait_for_lines_a_dead_gateway_held(
        tmp_path: Path, redis_server: RedisServer) -> None:
    h = harness(tmp_path, redis_server, new_prefix(), slow(0.3), batch_concurrency=1,
                batch_prefix_chars=0, batch_claim_timeout=0.5)
    async with h.running() as http:
        batch_id = await create(http, [chat_line(f"c{i}", "q") for i in range(10)])
        jobs = h.app.state.batch.engine.jobs
        job = await jobs.find("fireworks", batch_id)
        # A gateway takes a group and dies: the entry is never confirmed.
        assert await jobs.claim(job, "a-gateway-that-died", 60_000) is not None
        cancelled = await http.post(f"/v1/batches/{batch_id}/cancel", headers=auth())
        assert cancelled.json()["status"] == "cancelling"
        batch = await finished(http, batch_id)
    assert batch["status"] == "cancelled"


@pytest.mark.parametrize(("headers", "wait"), [
    ([(b"retry-after", b"5")], 5.0),
    ([], 1.0),
    ([(b"retry-after", b"1"), (b"x-should-retry", b"false")], None),  # admitted already
])
def test_a_line_goes_again_only_when_its_429_came_before_admission(
        headers: list[tuple[bytes, bytes]], wait: float | None) -> None:
    client = LineClient("/v1/chat/completions", b"{}", BatchLine("j", "a", "r"), "q")
    client.reply_headers = headers
    assert client.retry_after() == wait
