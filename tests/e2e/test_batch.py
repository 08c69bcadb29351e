"""Batch inference end to end: two gateway processes over one real redis-server and a shared
volume, the real SmolLM2 worker. The stock `openai` SDK uploads, creates, polls and
downloads, and each output equals the same request sent alone at temperature 0; cancel;
another account's files and batches are 404. Fireworks' dataset and job shape through HTTP.
A gateway killed (SIGKILL) mid-job: every line's output and usage record exactly once."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import orjson
import pytest
import redis.asyncio as aioredis

from gateway.controlplane.redis_ledger import read_records
from gateway.controlplane.usage import UsageRecord
from gateway.local_stack import Child
from tests.conftest import free_port
from tests.e2e.conftest import API_KEY, MODEL, OTHER_KEY, write_registry
from tests.e2e.processes import log_tails, start_gateway
from tests.redis_server import RedisServer

pytestmark = pytest.mark.e2e


@dataclass
class Pair:
    urls: list[str]  # two gateways sharing Redis and the volume
    children: list[Child]
    redis_url: str
    prefix: str


@pytest.fixture(scope="module")
def pair(smollm2_worker: str, redis_server: RedisServer,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    folder = tmp_path_factory.mktemp("batch")
    registry = write_registry(folder / "registry.yaml", smollm2_worker)
    prefix = f"bt{uuid.uuid4().hex[:6]}:"
    settings = {"redis_url": redis_server.url, "redis_prefix": prefix,
                "batch_dir": str(folder / "volume"), "batch_claim_timeout": "3",
                "batch_concurrency": "4"}
    ports = [free_port(), free_port()]
    children = [start_gateway(registry, port, **settings) for port in ports]
    yield Pair([f"http://127.0.0.1:{port}" for port in ports], children, redis_server.url,
               prefix)
    for child in children:
        child.stop()


def sdk(url: str, key: str = API_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/inference/v1", api_key=key, max_retries=0)


def line(custom_id: str, question: str, tokens: int = 12) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": MODEL, "temperature": 0, "max_tokens": tokens,
                     "messages": [{"role": "user", "content": question}]}}


def upload(client: openai.OpenAI, lines: list[dict[str, Any]]) -> str:
    data = b"".join(orjson.dumps(item) + b"\n" for item in lines)
    return client.files.create(file=("input.jsonl", io.BytesIO(data)), purpose="batch").id


def wait(client: openai.OpenAI, batch_id: str, seconds: float = 240) -> Any:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "cancelled", "expired"):
            return batch
        time.sleep(0.5)
    raise AssertionError(f"batch {batch_id} did not finish: {batch}")


def jsonl(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [orjson.loads(raw) for raw in client.files.content(file_id).content.splitlines()]


async def records(pair: Pair) -> list[UsageRecord]:
    client = aioredis.from_url(pair.redis_url)
    try:
        return await read_records(client, f"{pair.prefix}usage")
    finally:
        await client.aclose()


def test_the_openai_sdks_batch_equals_the_requests_sent_one_by_one(pair: Pair) -> None:
    client = sdk(pair.urls[0])
    questions = [f"Name a colour and a number, {i}." for i in range(6)]
    file_id = upload(client, [line(f"q{i}", q) for i, q in enumerate(questions)])
    batch = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                  completion_window="24h", metadata={"run": "e2e"})
    assert batch.status == "in_progress" and batch.metadata == {"run": "e2e"}
    done = wait(sdk(pair.urls[1]), batch.id)  # the other gateway sees the same job
    assert done.status == "completed", done
    assert done.request_counts.total == 6 and done.request_counts.completed == 6
    output = {item["custom_id"]: item for item in jsonl(client, done.output_file_id)}
    for i, question in enumerate(questions):
        alone = client.chat.completions.create(
            model=MODEL, temperature=0, max_tokens=12,
            messages=[{"role": "user", "content": question}])
        got = output[f"q{i}"]["response"]
        assert got["status_code"] == 200
        assert got["body"]["choices"][0]["message"]["content"] \
            == alone.choices[0].message.content
    assert [f.id for f in client.files.list().data if f.id == file_id] == [file_id]


def test_a_cancelled_batch_keeps_what_finished(pair: Pair) -> None:
    client = sdk(pair.urls[0])
    file_id = upload(client, [line(f"c{i}", f"Tell a long story, part {i}.", 48)
                              for i in range(40)])
    batch = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    deadline = time.monotonic() + 120
    while client.batches.retrieve(batch.id).request_counts.completed < 1:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert client.batches.cancel(batch.id).status in ("cancelling", "cancelled")
    done = wait(client, batch.id)
    assert done.status == "cancelled"
    kept = jsonl(client, done.output_file_id)
    assert 1 <= len(kept) == done.request_counts.completed < 40
    assert all(item["response"]["status_code"] == 200 for item in kept)


def test_another_account_finds_no_file_and_no_batch(pair: Pair) -> None:
    mine, theirs = sdk(pair.urls[0]), sdk(pair.urls[0], OTHER_KEY)
    file_id = upload(mine, [line("x", "Hello.")])
    batch = mine.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                completion_window="24h")
    for call in (lambda: theirs.files.retrieve(file_id),
                 lambda: theirs.files.content(file_id),
                 lambda: theirs.files.delete(file_id),
                 lambda: theirs.batches.retrieve(batch.id),
                 lambda: theirs.batches.cancel(batch.id),
                 lambda: theirs.batches.create(input_file_id=file_id,
                                               endpoint="/v1/chat/completions",
                                               completion_window="24h")):
        with pytest.raises(openai.NotFoundError):
            call()
    assert [f.id for f in theirs.files.list().data] == []
    assert wait(mine, batch.id).status == "completed"


def test_fireworks_datasets_and_a_batch_inference_job(pair: Pair) -> None:
    base = pair.urls[1] + "/v1/accounts/fireworks"
    headers = {"Authorization": f"Bearer {API_KEY}"}
    name = f"ds-{uuid.uuid4().hex[:6]}"
    rows = [{"custom_id": f"r{i}", "body": {"messages": [
        {"role": "user", "content": f"Say a word that starts with {c}."}]}}
        for i, c in enumerate("abc")]
    assert httpx.post(f"{base}/datasets", headers=headers,
                      json={"datasetId": name, "dataset": {}}).status_code == 200
    uploaded = httpx.post(f"{base}/datasets/{name}:upload", headers=headers, files={
        "file": ("d.jsonl", b"".join(orjson.dumps(r) + b"\n" for r in rows))})
    assert uploaded.status_code == 200 and uploaded.json()["exampleCount"] == "3"
    made = httpx.post(f"{base}/batchInferenceJobs", headers=headers, json={
        "model": MODEL, "inputDatasetId": f"accounts/fireworks/datasets/{name}",
        "inferenceParameters": {"maxTokens": 8, "temperature": 0}})
    assert made.status_code == 200, made.text
    job_name = made.json()["name"]
    deadline = time.monotonic() + 240
    while (job := httpx.get(f"{pair.urls[0]}/v1/{job_name}",
                            headers=headers).json())["state"] != "JOB_STATE_COMPLETED":
        assert time.monotonic() < deadline and job["state"] == "JOB_STATE_RUNNING", job
        time.sleep(0.5)
    progress = job["jobProgress"]
    assert progress["successfullyProcessedRequests"] == 3 and progress["inputTokens"] > 0
    output = job["outputDatasetId"].rsplit("/", 1)[1]
    rows_out = [orjson.loads(raw) for raw in httpx.get(
        f"{base}/datasets/{output}:download", headers=headers).content.splitlines()]
    for row, row_out in zip(rows, rows_out, strict=True):
        alone = httpx.post(pair.urls[0] + "/inference/v1/chat/completions", headers=headers,
                           json={"model": MODEL, "max_tokens": 8, "temperature": 0,
                                 **row["body"]}).json()
        assert row_out["custom_id"] == row["custom_id"]
        assert row_out["response"]["choices"][0]["message"] \
            == alone["choices"][0]["message"]
    other = httpx.get(f"{pair.urls[0]}/v1/{job_name}",
                      headers={"Authorization": f"Bearer {OTHER_KEY}"})
    assert other.status_code == 404


def test_a_gateway_killed_mid_job_loses_no_line_and_repeats_none(pair: Pair) -> None:
    """Both gateways run the job's lines; one is SIGKILLed with lines running. The other
    takes the lines it held once their claim times out (3 s here): every line's output is
    there once, and every line has one usage record."""
    client = sdk(pair.urls[0])
    lines = [line(f"k{i}", f"Count from {i} to {i + 5}.", 16) for i in range(48)]
    batch = client.batches.create(input_file_id=upload(client, lines),
                                  endpoint="/v1/chat/completions", completion_window="24h")
    deadline = time.monotonic() + 120
    while client.batches.retrieve(batch.id).request_counts.completed < 6:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    victim = pair.children[1]
    assert victim.process is not None
    os.killpg(victim.process.pid, signal.SIGKILL)
    done = wait(client, batch.id)
    assert done.status == "completed", (done, log_tails(*pair.urls))
    output = jsonl(client, done.output_file_id)
    assert sorted(item["custom_id"] for item in output) == sorted(f"k{i}" for i in range(48))
    assert all(item["response"]["status_code"] == 200 for item in output)
    assert done.request_counts.completed == 48 and done.request_counts.failed == 0
    mine = [r for r in asyncio.run(records(pair)) if r.batch == batch.id]
    assert len(mine) == 48 and len({r.record_id for r in mine}) == 48
    assert all(r.status == "ok" for r in mine)
