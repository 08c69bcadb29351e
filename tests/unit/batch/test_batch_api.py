"""Both batch APIs over scripted workers and a real redis-server: files, jobs, output lines,
per-account isolation and bounds, and every line an ordinary request (its usage record)."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from gateway.controlplane.redis_ledger import read_records
from tests.redis_server import RedisServer
from tests.unit.fake_worker import MODEL
from tests.unit.harness import Harness, auth, build, registry

OTHER_KEY = "k-other"


def answer(request: httpx.Request) -> httpx.Response:
    """A chat or completions answer that repeats the prompt's last words."""
    body = orjson.loads(request.content)
    if request.url.path.endswith("/chat/completions"):
        said = body["messages"][-1]["content"]
        choice: dict[str, Any] = {"index": 0, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": f"re: {said}"}}
        kind = "chat.completion"
    elif request.url.path.endswith("/completions"):
        choice = {"index": 0, "finish_reason": "stop", "text": f"re: {body['prompt']}"}
        kind = "text_completion"
    else:
        return httpx.Response(404, json={"error": {"message": "no such path"}})
    return httpx.Response(200, json={
        "id": "x", "object": kind, "created": 1, "model": "served", "choices": [choice],
        "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10,
                  "prompt_tokens_details": {"cached_tokens": 2}}})


@pytest.fixture
def prefix() -> str:
    return f"b{uuid.uuid4().hex[:6]}:"


def harness(tmp_path: Path, redis_server: RedisServer, prefix: str, **settings: Any
            ) -> Harness:
    return build(tmp_path, answer,
                 registry_of=lambda urls: registry(urls.values(), accounts={
                     "fireworks": "k-test", "other": OTHER_KEY}),
                 redis_url=redis_server.url, redis_prefix=prefix,
                 batch_dir=tmp_path / "volume", **settings)


def jsonl(items: list[dict[str, Any]]) -> bytes:
    return b"".join(orjson.dumps(item) + b"\n" for item in items)


def chat_line(custom_id: str, text: str) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": MODEL, "messages": [{"role": "user", "content": text}],
                     "max_tokens": 5}}


async def upload(http: httpx.AsyncClient, data: bytes, key: str = "k-test") -> str:
    response = await http.post("/v1/files", headers=auth(key), data={"purpose": "batch"},
                               files={"file": ("in.jsonl", data, "application/jsonl")})
    assert response.status_code == 200, response.text
    return str(response.json()["id"])


async def finished(http: httpx.AsyncClient, batch_id: str, key: str = "k-test"
                   ) -> dict[str, Any]:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        batch = (await http.get(f"/v1/batches/{batch_id}", headers=auth(key))).json()
        if batch["status"] in ("completed", "failed", "cancelled", "expired"):
            return dict(batch)
        await asyncio.sleep(0.1)
    raise AssertionError(f"batch {batch_id} did not finish: {batch}")


async def content(http: httpx.AsyncClient, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    response = await http.get(f"/v1/files/{file_id}/content", headers=auth())
    assert response.status_code == 200
    return [orjson.loads(line) for line in response.content.splitlines()]


async def test_a_batch_runs_every_line_as_a_request_with_one_record_each(
        tmp_path: Path, redis_server: RedisServer, prefix: str) -> None:
    h = harness(tmp_path, redis_server, prefix)
    lines = [chat_line(f"q{i}", f"question {i}") for i in range(6)]
    lines.append({"custom_id": "bad", "method": "POST", "url": "/v1/completions",
                  "body": {"model": MODEL, "prompt": "x"}})  # another endpoint: refused
    lines.append(chat_line("q0", "again"))  # a custom_id taken: refused
    async with h.running() as http:
        file_id = await upload(http, jsonl(lines))
        created = await http.post("/v1/batches", headers=auth(), json={
            "input_file_id": file_id, "endpoint": "/v1/chat/completions",
            "completion_window": "24h", "metadata": {"run": "1"}})
        assert created.status_code == 200, created.text
        batch = await finished(http, created.json()["id"])
        assert batch["status"] == "completed"
        assert batch["request_counts"] == {"total": 8, "completed": 6, "failed": 2}
        assert batch["metadata"] == {"run": "1"}
        assert batch["usage"]["input_tokens"] == 42
        assert batch["usage"]["input_tokens_details"]["cached_tokens"] == 12
        output = await content(http, batch["output_file_id"])
        errors = await content(http, batch["error_file_id"])
    assert [line["custom_id"] for line in output] == [f"q{i}" for i in range(6)]
    for i, line in enumerate(output):
        assert line["error"] is None and line["response"]["status_code"] == 200
        assert line["response"]["body"]["choices"][0]["message"]["content"] \
            == f"re: question {i}"
    assert [(e["custom_id"], e["error"]["code"]) for e in errors] == [
        ("bad", "invalid_request"), ("q0", "invalid_request")]
    assert "is not the batch's endpoint" in errors[0]["error"]["message"]
    records = await read_records(_async(redis_server), f"{prefix}usage")
    assert len(records) == 6 and all(r.batch == created.json()["id"] for r in records)
    assert len({r.record_id for r in records}) == 6
    assert all(r.status == "ok" and r.prompt_tokens == 7 for r in records)


def _async(redis_server: RedisServer) -> Any:
    import redis.asyncio as aioredis
    return aioredis.from_url(redis_server.url)


async def test_another_accounts_files_and_batches_are_not_found(
        tmp_path: Path, redis_server: RedisServer, prefix: str) -> None:
    h = harness(tmp_path, redis_server, prefix)
    async with h.running() as http:
        file_id = await upload(http, jsonl([chat_line("a", "hello")]))
        batch_id = (await http.post("/v1/batches", headers=auth(), json={
            "input_file_id": file_id, "endpoint": "/v1/chat/completions",
            "completion_window": "24h"})).json()["id"]
        other = auth(OTHER_KEY)
        for method, path in (("GET", f"/v1/files/{file_id}"),
                             ("GET", f"/v1/files/{file_id}/content"),
                             ("DELETE", f"/v1/files/{file_id}"),
                             ("GET", f"/v1/batches/{batch_id}"),
                             ("POST", f"/v1/batches/{batch_id}/cancel")):
            response = await http.request(method, path, headers=other)
            assert response.status_code == 404, (method, path, response.text)
            assert "error" in response.json()
        made = await http.post("/v1/batches", headers=other, json={
            "input_file_id": file_id, "endpoint": "/v1/chat/completions",
            "completion_window": "24h"})
        assert made.status_code == 404
        assert (await http.get("/v1/files", headers=other)).json()["data"] == []
        assert (await http.get("/v1/batches", headers=other)).json()["data"] == []
        listed = (await http.get("/v1/files", headers=auth())).json()["data"]
        assert file_id in [f["id"] for f in listed]
        assert (await finished(http, batch_id))["status"] == "completed"
