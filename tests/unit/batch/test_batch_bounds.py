"""What one account can make the gateway hold through batch, each bound sent its hostile
input: a file's size (declared or not), an account's bytes (also by uploads at once), a
file's lines, jobs running, and a line that is too large or too wide as a request (the
shared path's bounds, as an error line)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import orjson
import pytest

from gateway.server.protocol import EdgeProtocol
from tests.redis_server import RedisServer
from tests.unit.batch.scene import (
    KEY,
    MODEL,
    OTHER_KEY,
    answer,
    auth,
    chat_line,
    content,
    finished,
    harness,
    jsonl,
    new_prefix,
    upload,
)
from tests.unit.harness import build, registry, serving


async def raw_request(host: str, port: int, head: bytes, body: bytes = b"") -> bytes:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(head + body)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(65536), 5)
    finally:
        writer.close()


@pytest.mark.parametrize("key", [None, KEY])
async def test_an_upload_past_the_file_limit_or_without_a_key_is_refused_before_its_body(
        tmp_path: Path, redis_server: RedisServer, key: str | None) -> None:
    """Without a key (900 bytes declared) or 10 GB declared with one, and no byte of the
    body sent: the answer comes at once (401 or 413), so the body is never read."""
    h = harness(tmp_path, redis_server, new_prefix(), batch_file_max_bytes=1000)
    size = b"900" if key is None else b"10000000000"
    head = (b"POST /v1/files HTTP/1.1\r\nhost: gw\r\ncontent-length: " + size + b"\r\n"
            b"content-type: multipart/form-data; boundary=x\r\n"
            + (f"authorization: Bearer {key}\r\n".encode() if key else b"") + b"\r\n")
    async with serving(h, EdgeProtocol) as (host, port):
        answer = await raw_request(host, port, head)
    assert answer.startswith(b"HTTP/1.1 401" if key is None else b"HTTP/1.1 413"), answer


async def chunked(data: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(data), 256):
        yield data[start:start + 256]


async def test_a_file_past_the_limit_sent_without_a_length_is_cut_and_nothing_kept(
        tmp_path: Path, redis_server: RedisServer) -> None:
    h = harness(tmp_path, redis_server, new_prefix(), batch_file_max_bytes=2000)
    form = (b"--x\r\ncontent-disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
            b"--x\r\ncontent-disposition: form-data; name=\"file\"; filename=\"a\"\r\n\r\n"
            + jsonl([chat_line(f"c{i}", "y" * 50) for i in range(40)]) + b"\r\n--x--\r\n")
    async with h.running() as http:
        refused = await http.post("/v1/files", content=chunked(form), headers=auth() | {
            "content-type": "multipart/form-data; boundary=x"})
        listed = (await http.get("/v1/files", headers=auth())).json()["data"]
        used = await h.app.state.batch.files.used("fireworks")
    assert refused.status_code == 413, refused.text
    assert listed == [] and used == 0
    assert [p.name for p in (tmp_path / "volume").rglob("*") if p.is_file()] == []


async def test_an_accounts_bytes_are_bounded_also_for_uploads_at_once(
        tmp_path: Path, redis_server: RedisServer) -> None:
    one = jsonl([chat_line(f"c{i}", "z" * 40) for i in range(5)])  # ~900 bytes
    h = harness(tmp_path, redis_server, new_prefix(),
                batch_account_max_bytes=len(one) * 3 // 2 + 400)
    async with h.running() as http:
        async def send(key: str = KEY) -> httpx.Response:
            return await http.post("/v1/files", headers=auth(key), data={"purpose": "batch"},
                                   files={"file": ("a.jsonl", one)})
        answers = await asyncio.gather(*(send() for _ in range(4)))
        theirs = await send(OTHER_KEY)  # another account's bytes are its own
        kept = [a.json()["id"] for a in answers if a.status_code == 200]
        assert sorted(a.status_code for a in answers) == [200, 413, 413, 413]
        assert theirs.status_code == 200
        assert await h.app.state.batch.files.used("fireworks") == len(one)
        assert (await http.delete(f"/v1/files/{kept[0]}", headers=auth())).status_code == 200
        assert (await send()).status_code == 200  # room again


async def test_a_file_with_too_many_lines_fails_its_job_and_jobs_per_account_are_bounded(
        tmp_path: Path, redis_server: RedisServer) -> None:
    h = harness(tmp_path, redis_server, new_prefix(), batch_file_max_lines=3,
                batch_account_max_jobs=1, batch_concurrency=1)
    async with h.running() as http:
        many = await upload(http, jsonl([chat_line(f"c{i}", "q") for i in range(4)]))
        job = (await http.post("/v1/batches", headers=auth(), json={
            "input_file_id": many, "endpoint": "/v1/chat/completions",
            "completion_window": "24h"})).json()
        assert job["status"] == "failed"
        assert "at most 3 are allowed" in job["errors"]["data"][0]["message"]
        h.app.state.gateway.settings.queue_replica_load = 2  # lines wait: headroom 1
        h.app.state.gateway.replicas.load.of = lambda url: 1
        few = await upload(http, jsonl([chat_line(f"c{i}", "q") for i in range(3)]))
        first = await http.post("/v1/batches", headers=auth(), json={
            "input_file_id": few, "endpoint": "/v1/chat/completions",
            "completion_window": "24h"})
        second = await http.post("/v1/batches", headers=auth(), json={
            "input_file_id": few, "endpoint": "/v1/chat/completions",
            "completion_window": "24h"})
        assert first.status_code == 200
        assert second.status_code == 429, second.text
        assert second.json()["error"]["message"].startswith("The account has 1 batch jobs")
        del h.app.state.gateway.replicas.load.of  # room again
        h.app.state.gateway.queues.dispatch_all()
        await finished(http, first.json()["id"])


async def test_a_line_past_the_requests_bounds_is_an_error_line_like_the_request(
        tmp_path: Path, redis_server: RedisServer) -> None:
    h = harness(tmp_path, redis_server, new_prefix(), max_body_bytes=4000, max_sequences=4)
    lines = [chat_line("large", "w" * 5000), chat_line("fine", "hello")]
    wide = chat_line("wide", "hi")
    wide["body"]["n"] = 5
    lines.append(wide)
    async with h.running() as http:
        file_id = await upload(http, jsonl(lines))
        batch = await finished(http, (await http.post("/v1/batches", headers=auth(), json={
            "input_file_id": file_id, "endpoint": "/v1/chat/completions",
            "completion_window": "24h"})).json()["id"])
        errors = {line["custom_id"]: line for line in
                  await content(http, batch["error_file_id"])}
        output = await content(http, batch["output_file_id"])
    assert batch["request_counts"] == {"total": 3, "completed": 1, "failed": 2}
    assert [line["custom_id"] for line in output] == ["fine"]
    assert errors["large"]["response"]["status_code"] == 413
    assert errors["wide"]["response"]["status_code"] == 400
    assert "sequences" in errors["wide"]["response"]["body"]["error"]["message"]
    sent = [orjson.loads(r.content) for r in h.workers.served.requests]  # type: ignore[union-attr]
    assert [body["messages"][0]["content"] for body in sent] == ["hello"]
    assert MODEL


async def test_an_id_cannot_reach_into_an_account_whose_id_extends_ones_own(
        tmp_path: Path, redis_server: RedisServer) -> None:
    """Redis keys are `<account>:<id>`: with accounts `fireworks` and `fireworks:eu`, the
    first asking for `eu:<id>` would name the second's keys. Ids with ':' are not found."""
    h = build(tmp_path, answer, registry_of=lambda urls: registry(
        urls.values(), accounts={"fireworks": KEY, "fireworks:eu": "k-eu"}),
        redis_url=redis_server.url, redis_prefix=new_prefix(), batch_dir=tmp_path / "v")
    async with h.running() as http:
        theirs = await http.post("/v1/files", headers=auth("k-eu"), data={"purpose": "batch"},
                                 files={"file": ("a.jsonl", jsonl([chat_line("a", "x")]))})
        file_id = theirs.json()["id"]
        for method, path in (("GET", f"/v1/files/eu:{file_id}"),
                             ("GET", f"/v1/files/eu:{file_id}/content"),
                             ("DELETE", f"/v1/files/eu:{file_id}")):
            response = await http.request(method, path, headers=auth())
            assert response.status_code == 404, (method, path, response.text)
        assert (await http.get(f"/v1/files/{file_id}", headers=auth("k-eu"))).status_code \
            == 200


async def test_deleting_a_file_twice_at_once_gives_its_bytes_back_once(
        tmp_path: Path, redis_server: RedisServer) -> None:
    h = harness(tmp_path, redis_server, new_prefix())
    async with h.running() as http:
        file_id = await upload(http, jsonl([chat_line("a", "x" * 500)]))
        answers = await asyncio.gather(*(http.delete(f"/v1/files/{file_id}", headers=auth())
                                         for _ in range(4)))
        used = await h.app.state.batch.files.used("fireworks")
    assert sorted(a.status_code for a in answers).count(200) == 1
    assert used == 0


async def test_a_malformed_upload_is_a_400(tmp_path: Path, redis_server: RedisServer) -> None:
    h = harness(tmp_path, redis_server, new_prefix())
    async with h.running() as http:
        bad = await http.post("/v1/files", content=b"garbage", headers=auth() | {
            "content-type": "multipart/form-data; boundary=x"})
        used = await h.app.state.batch.files.used("fireworks")
    assert bad.status_code == 400, bad.text
    assert used == 0
