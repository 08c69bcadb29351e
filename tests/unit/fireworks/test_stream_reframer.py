"""Usage placement in streams (docs/fireworks-api.md, "Streaming") on fake worker chunks."""

from __future__ import annotations

import time
from typing import Any

import orjson
import pytest

from gateway.api import Served
from gateway.errors import WorkerFault
from gateway.fireworks.perf import perf_metrics
from gateway.fireworks.sampling import Plan
from gateway.fireworks.stream import StreamReframer

USAGE = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5,
         "prompt_tokens_details": {"cached_tokens": 0}}


def call(include_usage: bool | None, perf: bool = False) -> StreamReframer:
    plan = Plan(chat=False, include_usage=include_usage, perf_metrics_in_response=perf)
    served = Served(deployment="accounts/a/deployments/d", backend_host="w:1", concurrent=1,
                    started=time.monotonic())
    return StreamReframer(plan, "accounts/a/models/m",
                          lambda usage, engine, complete: perf_metrics(served, usage, engine,
                                                                       complete))


def worker_chunks(n: int = 1) -> list[dict[str, Any]]:
    base = {"id": "x", "object": "text_completion", "created": 1, "model": "served"}
    chunks = []
    for i in range(n):
        chunks.append(base | {"choices": [{"index": i, "text": "a", "finish_reason": None}],
                              "usage": USAGE})
    for i in range(n):
        chunks.append(base | {"choices": [{"index": i, "text": "b", "finish_reason": "stop"}],
                              "usage": USAGE})
    chunks.append(base | {"choices": [], "usage": USAGE, "metrics": {
        "time_to_first_token_ms": 12.0}})
    return chunks


def reframe(reframer: StreamReframer, chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = [part for chunk in chunks for part in reframer.chunk(chunk)]
    return [orjson.loads(part.removeprefix(b"data: ")) for part in out]


@pytest.mark.parametrize("n", [1, 3])
def test_default_usage_rides_on_every_finish_chunk(n: int) -> None:
    out = reframe(call(None), worker_chunks(n))
    assert len(out) == 2 * n
    for chunk in out:
        finished = chunk["choices"][0]["finish_reason"] is not None
        assert chunk["usage"] == (USAGE if finished else None)
        assert chunk["model"] == "accounts/a/models/m"
        assert "metrics" not in chunk


def test_include_usage_true_adds_one_empty_choices_chunk() -> None:
    out = reframe(call(True), worker_chunks(2))
    assert [c["usage"] for c in out[:-1]] == [None] * 4
    assert out[-1]["choices"] == [] and out[-1]["usage"] == USAGE


def test_include_usage_false_sends_no_usage() -> None:
    out = reframe(call(False), worker_chunks(1))
    assert all(c["usage"] is None for c in out) and all(c["choices"] for c in out)


def test_perf_metrics_only_on_the_final_chunk() -> None:
    out = reframe(call(None, perf=True), worker_chunks(1))
    assert "perf_metrics" not in out[0]
    metrics = out[-1]["perf_metrics"]
    assert metrics["prompt-tokens"] == 3
    assert metrics["server-time-to-first-token"] == pytest.approx(0.012)
    assert metrics["deployment"] == "accounts/a/deployments/d"


def parsed(parts: list[bytes]) -> list[dict[str, Any]]:
    return [orjson.loads(part.removeprefix(b"data: ")) for part in parts]


def test_done_without_a_usage_chunk_releases_the_held_finish_chunk() -> None:
    reframer = call(None)
    chunks = worker_chunks(1)[:-1]  # no usage-only chunk
    assert len(reframe(reframer, chunks)) == 1  # the finish chunk is held
    (finish,) = parsed(reframer.end())
    assert finish["choices"][0]["finish_reason"] == "stop" and finish["usage"] == USAGE


def test_drain_before_an_error_event_sends_held_chunks() -> None:
    reframer = call(True)
    reframe(reframer, worker_chunks(1)[:-1])
    (finish,) = parsed(reframer.drain())
    assert finish["choices"][0]["text"] == "b" and finish["usage"] is None
    assert reframer.drain() == []


def test_done_before_any_finish_reason_is_a_fault() -> None:
    reframer = call(None)
    reframe(reframer, worker_chunks(1)[:1])
    with pytest.raises(WorkerFault):
        reframer.end()
