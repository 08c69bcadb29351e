"""Fireworks' shape over the same engine: a dataset of `custom_id` + `body` lines, a batch
inference job with inferenceParameters (extraBody included), its progress and its output
dataset; a job continued from another; another account's datasets and jobs not found."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.redis_server import RedisServer
from tests.unit.batch.scene import (
    MODEL,
    OTHER_KEY,
    answer,
    auth,
    harness,
    jsonl,
    new_prefix,
    usage,
)
from tests.unit.fake_worker import Served

BASE = "/v1/accounts/fireworks"


async def dataset(http: httpx.AsyncClient, name: str, lines: list[dict[str, Any]]) -> None:
    made = await http.post(f"{BASE}/datasets", headers=auth(),
                           json={"datasetId": name, "dataset": {"displayName": name.upper()}})
    assert made.status_code == 200, made.text
    assert made.json()["state"] == "UPLOADING"
    uploaded = await http.post(f"{BASE}/datasets/{name}:upload", headers=auth(),
                               files={"file": ("d.jsonl", jsonl(lines))})
    assert uploaded.status_code == 200, uploaded.text
    assert uploaded.json() | {"createTime": None} == {
        "name": f"accounts/fireworks/datasets/{name}", "displayName": name.upper(),
        "createTime": None, "state": "READY", "exampleCount": str(len(lines)),
        "format": "FORMAT_UNSPECIFIED", "userUploaded": {}}


async def done(http: httpx.AsyncClient, job: str) -> dict[str, Any]:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        found = (await http.get(f"{BASE}/batchInferenceJobs/{job}", headers=auth())).json()
        if found["state"] in ("JOB_STATE_COMPLETED", "JOB_STATE_FAILED",
                              "JOB_STATE_CANCELLED", "JOB_STATE_EXPIRED"):
            return dict(found)
        await asyncio.sleep(0.1)
    raise AssertionError(found)


async def output(http: httpx.AsyncClient, name: str) -> list[dict[str, Any]]:
    got = await http.get(f"{BASE}/datasets/{name}:download", headers=auth())
    assert got.status_code == 200, got.text
    return [orjson.loads(line) for line in got.content.splitlines()]


async def test_a_job_runs_its_dataset_with_the_jobs_parameters(
        tmp_path: Path, redis_server: RedisServer) -> None:
    sent: list[dict[str, Any]] = []

    def recording(request: httpx.Request) -> httpx.Response:
        sent.append(orjson.loads(request.content))
        return answer(request)
    h = harness(tmp_path, redis_server, new_prefix(), recording)
    lines = [{"custom_id": f"c{i}", "body": {"messages": [{"role": "user",
                                                             "content": f"say {i}"}]}}
             for i in range(4)]
    lines.append({"custom_id": "own", "body": {"messages": [{"role": "user",
                                                              "content": "mine"}],
                                                "max_tokens": 2}})
    lines.append({"custom_id": "broken", "body": "not an object"})
    async with h.running() as http:
        await dataset(http, "questions", lines)
        made = await http.post(f"{BASE}/batchInferenceJobs?batchInferenceJobId=job-1",
                               headers=auth(), json={
                                   "model": MODEL,
                                   "inputDatasetId": "accounts/fireworks/datasets/questions",
                                   "outputDatasetId": "answers", "displayName": "nightly",
                                   "inferenceParameters": {
                                       "maxTokens": 9, "temperature": 0.5,
                                       "extraBody": '{"stop": ["\\n"], "top_k": 3}'}})
        assert made.status_code == 200, made.text
        assert made.json()["name"] == "accounts/fireworks/batchInferenceJobs/job-1"
        job = await done(http, "job-1")
        answers = await output(http, "answers")
        listed = (await http.get(f"{BASE}/batchInferenceJobs", headers=auth())).json()
    assert job["state"] == "JOB_STATE_COMPLETED"
    assert job["jobProgress"] == {
        "percent": 100, "epoch": 0, "totalInputRequests": 6, "totalProcessedRequests": 6,
        "successfullyProcessedRequests": 5, "failedRequests": 1, "outputRows": 6,
        "inputTokens": 35, "outputTokens": 15, "cachedInputTokenCount": 10}
    assert job["outputDatasetId"] == "accounts/fireworks/datasets/answers"
    assert job["displayName"] == "nightly"
    assert [a["custom_id"] for a in answers] == ["c0", "c1", "c2", "c3", "own", "broken"]
    assert answers[0]["response"]["choices"][0]["message"]["content"] == "re: say 0"
    assert answers[5]["error"]["message"] == "body must be an object"
    mine = next(body for body in sent if body["messages"][0]["content"] == "mine")
    theirs = next(body for body in sent if body["messages"][0]["content"] == "say 0")
    assert (theirs["max_tokens"], theirs["temperature"], theirs["stop"], theirs["top_k"]) \
        == (9, 0.5, ["\n"], 3)
    assert mine["max_tokens"] == 2  # the line's own field wins
    assert [j["name"] for j in listed["batchInferenceJobs"]] \
        == ["accounts/fireworks/batchInferenceJobs/job-1"]


async def test_a_continued_job_runs_only_what_the_earlier_one_did_not_finish(
        tmp_path: Path, redis_server: RedisServer) -> None:
    flaky = {"fail": True}

    def sometimes(request: httpx.Request) -> httpx.Response:
        body = orjson.loads(request.content)
        if flaky["fail"] and body["messages"][0]["content"] == "two":
            return httpx.Response(400, json={"error": {"message": "refused this once"}})
        return answer(request)
    h = harness(tmp_path, redis_server, new_prefix(), sometimes)
    lines = [{"custom_id": c, "body": {"messages": [{"role": "user", "content": c}]}}
             for c in ("one", "two", "three")]
    async with h.running() as http:
        await dataset(http, "input", lines)
        first = await http.post(f"{BASE}/batchInferenceJobs?batchInferenceJobId=first",
                                headers=auth(), json={"model": MODEL,
                                                      "inputDatasetId": "input"})
        assert first.status_code == 200, first.text
        assert (await done(http, "first"))["jobProgress"]["failedRequests"] == 1
        flaky["fail"] = False
        h.workers.served = Served()  # type: ignore[union-attr]
        second = await http.post(f"{BASE}/batchInferenceJobs?batchInferenceJobId=second",
                                 headers=auth(), json={
                                     "model": MODEL, "inputDatasetId": "input",
                                     "continuedFromJobName":
                                         "accounts/fireworks/batchInferenceJobs/first"})
        assert second.status_code == 200, second.text
        job = await done(http, "second")
        answers = await output(http, "second-output")
    assert [orjson.loads(r.content)["messages"][0]["content"]
            for r in h.workers.served.requests] == ["two"]  # type: ignore[union-attr]
    assert job["continuedFromJobName"] == "accounts/fireworks/batchInferenceJobs/first"
    assert job["jobProgress"]["successfullyProcessedRequests"] == 3
    assert [(a["custom_id"], "response" in a) for a in answers] == [
        ("one", True), ("two", True), ("three", True)]


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/datasets/questions"), ("GET", "/datasets/questions:download"),
    ("DELETE", "/datasets/questions"), ("GET", "/batchInferenceJobs/job-1"),
    ("DELETE", "/batchInferenceJobs/job-1"), ("GET", "/datasets"),
    ("GET", "/batchInferenceJobs")])
async def test_another_accounts_datasets_and_jobs_are_not_found(
        tmp_path: Path, redis_server: RedisServer, method: str, path: str) -> None:
    h = harness(tmp_path, redis_server, new_prefix())
    async with h.running() as http:
        await dataset(http, "questions", [{"custom_id": "a", "body": {
            "messages": [{"role": "user", "content": "hi"}]}}])
        made = await http.post(f"{BASE}/batchInferenceJobs?batchInferenceJobId=job-1",
                               headers=auth(), json={"model": MODEL,
                                                     "inputDatasetId": "questions"})
        assert made.status_code == 200
        theirs = await http.request(method, BASE + path, headers=auth(OTHER_KEY))
        own_path = await http.request(method, "/v1/accounts/other" + path,
                                      headers=auth(OTHER_KEY))
        mine = await http.get(f"{BASE}/datasets/questions", headers=auth())
    assert theirs.status_code == 404, theirs.text
    assert own_path.status_code in (200, 404)
    if own_path.status_code == 200:  # a listing of its own: empty
        assert not any(own_path.json()[key] for key in own_path.json()
                       if isinstance(own_path.json()[key], list))
    assert mine.status_code == 200


async def test_a_job_id_used_again_bills_its_lines_again(
        tmp_path: Path, redis_server: RedisServer) -> None:
    prefix = new_prefix()
    h = harness(tmp_path, redis_server, prefix)
    async with h.running() as http:
        await dataset(http, "in", [{"custom_id": "a", "body": {
            "messages": [{"role": "user", "content": "hi"}]}}])
        for run in range(2):
            made = await http.post(f"{BASE}/batchInferenceJobs?batchInferenceJobId=again",
                                   headers=auth(), json={"model": MODEL, "inputDatasetId": "in",
                                                         "outputDatasetId": f"out-{run}"})
            assert made.status_code == 200, made.text
            assert (await done(http, "again"))["state"] == "JOB_STATE_COMPLETED"
            deleted = await http.delete(f"{BASE}/batchInferenceJobs/again", headers=auth())
            assert deleted.status_code == 200
    records = await usage(redis_server, prefix)
    assert len(records) == 2 and len({r.record_id for r in records}) == 2
