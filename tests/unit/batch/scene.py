"""The scene of the batch tests: a gateway over scripted workers and a real redis-server,
its files on a temporary volume; two accounts."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import orjson
import redis.asyncio as aioredis

from gateway.controlplane.redis_ledger import read_records
from gateway.controlplane.usage import UsageRecord
from tests.redis_server import RedisServer
from tests.unit.fake_worker import KEY, MODEL, Handler
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


def new_prefix() -> str:
    return f"b{uuid.uuid4().hex[:6]}:"


def harness(tmp_path: Path, redis_server: RedisServer, prefix: str,
            handler: Handler = answer, accounts: dict[str, Any] | None = None,
            **settings: Any) -> Harness:
    """`accounts`: account id -> its fields in the registry (limits, ...)."""
    def of(urls: dict[str, str]) -> dict[str, Any]:
        content = registry(urls.values(), accounts={"fireworks": KEY, "other": OTHER_KEY})
        for account in content["accounts"]:
            account.update((accounts or {}).get(account["id"], {}))
        return content
    return build(tmp_path, handler, registry_of=of, redis_url=redis_server.url,
                 redis_prefix=prefix, batch_dir=tmp_path / "volume", **settings)


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


async def usage(redis_server: RedisServer, prefix: str) -> list[UsageRecord]:
    client = aioredis.from_url(redis_server.url)
    try:
        return await read_records(client, f"{prefix}usage")
    finally:
        await client.aclose()


