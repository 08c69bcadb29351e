"""OpenAI's Files and Batches over scripted workers and a real redis-server: output lines,
per-account isolation, and every line an ordinary request (its usage record)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.redis_server import RedisServer
from tests.unit.batch.scene import (
    MODEL,
    OTHER_KEY,
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


@pytest.fixture
def prefix() -> str:
    return new_prefix()


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
    records = await usage(redis_server, prefix)
    assert len(records) == 6 and all(r.batch == created.json()["id"] for r in records)
    assert len({r.record_id for r in records}) == 6
    assert all(r.status == "ok" and r.prompt_tokens == 7 for r in records)


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
