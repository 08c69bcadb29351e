"""A long greedy stream whose worker is killed (SIGKILL) mid-stream goes on on the other real
vLLM worker: the client's whole text and token ids equal an uninterrupted run's, byte for
byte, for chat and for completions, with one usage record each (Redis). The streams are
drawn to the pod that is killed by caching their prompts there first (KV-event routing)."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis.asyncio as aioredis
import yaml

from gateway.controlplane.redis_ledger import read_records
from gateway.controlplane.registry import hash_key
from gateway.dataplane.isolation import account_salt
from gateway.local_stack import Child
from tests.conftest import free_port, free_port_pair
from tests.e2e.conftest import API_KEY, KV_EVENTS
from tests.e2e.processes import log_tails, start_gateway, start_worker
from tests.redis_server import RedisServer

pytestmark = pytest.mark.e2e
MODEL = "accounts/fireworks/models/migrating"
SALT = account_salt("fireworks", "")
TOKENS = 160  # a stream long enough to be killed in the middle of


@dataclass
class Pods:
    gateway: str
    kept: str  # the session's worker
    doomed: str  # killed mid-stream
    doomed_child: Child
    redis_url: str
    prefix: str
    restart: Callable[..., None]  # the doomed pod started again (with these flags)


@pytest.fixture(scope="module")
def pods(smollm2_worker: str, smollm2_dir: Path, redis_server: RedisServer,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pods]:
    if smollm2_worker not in KV_EVENTS:
        pytest.fail("the session worker publishes no KV events (E2E_REUSE_WORKER?)")
    port, events = free_port(), free_port_pair()
    doomed = f"http://127.0.0.1:{port}"

    def start(*flags: str) -> Child:
        return start_worker(smollm2_dir, port, "--max-model-len", "2048",
                            "--served-model-name", "smollm2", "--kv-events-port", str(events),
                            *flags)

    child = start()
    registry = tmp_path_factory.mktemp("migration") / "registry.yaml"
    registry.write_text(yaml.safe_dump({
        "accounts": [{"id": "fireworks", "api_keys": [hash_key(API_KEY)]}],
        "deployments": [{"id": "migrating", "account": "fireworks", "model": MODEL,
                         "default": True, "context_length": 2048, "replicas": [
                             {"url": smollm2_worker, "kv_events": KV_EVENTS[smollm2_worker]},
                             {"url": doomed, "kv_events": f"tcp://127.0.0.1:{events}"}]}]}))
    prefix = f"m{uuid.uuid4().hex[:6]}:"
    gateway_port = free_port()
    gateway = start_gateway(registry, gateway_port, health_check_interval="0.5",
                            redis_url=redis_server.url, redis_prefix=prefix)
    time.sleep(1.5)  # the gateway has subscribed to both pods' KV events
    found = Pods(f"http://127.0.0.1:{gateway_port}", smollm2_worker, doomed, child,
                 redis_server.url, prefix, lambda *flags: None)

    def restart(*flags: str) -> None:
        found.doomed_child.stop()
        found.doomed_child = start(*flags)

    found.restart = restart
    yield found
    gateway.stop()
    found.doomed_child.stop()


def body(chat: bool, topic: str) -> dict[str, Any]:
    request: dict[str, Any] = {"model": MODEL, "stream": True, "temperature": 0,
                               "max_tokens": TOKENS, "return_token_ids": True}
    words = " ".join(f"{topic}{j}" for j in range(60))  # a prefix of its own, many blocks
    if chat:
        return request | {"messages": [{"role": "user", "content":
                                        f"Here are some words: {words}. Write a long story "
                                        f"about {topic}."}]}
    return request | {"prompt": f"Words: {words}. A long story about {topic}:"}


def warm(pod: str, chat: bool, topic: str) -> None:
    """Cache the request's prompt on `pod`, as another client of it would."""
    request = body(chat, topic) | {"model": "smollm2", "stream": False, "max_tokens": 1,
                                   "cache_salt": SALT}
    request.pop("return_token_ids")
    path = "/v1/chat/completions" if chat else "/v1/completions"
    answer = httpx.post(pod + path, json=request, timeout=60)
    assert answer.status_code == 200, answer.text


@dataclass
class Streamed:
    text: str = ""
    ids: list[int] | None = None
    backend: str = ""
    errors: int = 0
    chunks: int = 0
    usage: dict[str, Any] | None = None


def read(gateway: str, chat: bool, topic: str, out: Streamed,
         first: threading.Event | None = None) -> None:
    path = "/inference/v1/chat/completions" if chat else "/inference/v1/completions"
    out.ids = []
    with httpx.stream("POST", gateway + path, json=body(chat, topic), timeout=120,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as response:
        assert response.status_code == 200
        out.backend = response.headers["fireworks-backend-host"]
        for line in response.iter_lines():
            if line.startswith("event: error"):
                out.errors += 1
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = orjson.loads(line[6:])
            if "error" in chunk:
                out.errors += 1
                continue
            out.usage = chunk.get("usage") or out.usage
            for choice in chunk["choices"]:
                out.text += (choice["delta"].get("content") or "") if chat else choice["text"]
                out.ids += choice.get("token_ids") or []
                out.chunks += 1
            if first is not None and out.chunks >= 40:
                first.set()


async def records(pods: Pods, at_least: int = 0) -> list[Any]:
    """The usage records in Redis (waiting a little for `at_least` of them: the gateway
    writes them in the background)."""
    client = aioredis.from_url(pods.redis_url)
    try:
        for _ in range(50):
            found = await read_records(client, f"{pods.prefix}usage")
            if len(found) >= at_least:
                break
            await asyncio.sleep(0.1)
        return found
    finally:
        await client.aclose()


def streams_cut(pods: Pods, cases: list[tuple[bool, str]], cut: Callable[[], None]
                ) -> dict[bool, Streamed]:
    """The cases' streams, drawn to the doomed pod (their prompts cached there), cut by
    `cut` 40 pieces into both; then each compared with an uninterrupted run on the pod
    left."""
    migrated = {chat: Streamed() for chat, _ in cases}
    started = {chat: threading.Event() for chat, _ in cases}
    for chat, topic in cases:
        warm(pods.doomed, chat, topic)
    time.sleep(0.5)
    threads = [threading.Thread(target=read, args=(pods.gateway, chat, topic, migrated[chat],
                                                   started[chat])) for chat, topic in cases]
    for thread in threads:
        thread.start()
    for chat, _ in cases:
        assert started[chat].wait(120), log_tails(pods.gateway, pods.doomed)
    cut()
    for thread in threads:
        thread.join(180)
    reference = {chat: Streamed() for chat, _ in cases}
    for chat, topic in cases:
        read(pods.gateway, chat, topic, reference[chat])
        assert reference[chat].backend == pods.kept.removeprefix("http://")
        assert len(reference[chat].ids or []) > 100 and reference[chat].errors == 0
    for chat, _ in cases:
        streamed = migrated[chat]
        assert streamed.backend == pods.doomed.removeprefix("http://"), log_tails(pods.gateway)
        assert streamed.errors == 0, log_tails(pods.gateway)
        assert streamed.ids == reference[chat].ids
        assert streamed.text == reference[chat].text
        # The prompt once, every token once (what each pod had cached differs).
        counts = ("prompt_tokens", "completion_tokens", "total_tokens")
        assert streamed.usage and reference[chat].usage
        assert [streamed.usage[k] for k in counts] == [reference[chat].usage[k] for k in counts]
    return migrated


async def test_a_killed_workers_streams_go_on_on_the_other_byte_for_byte(pods: Pods) -> None:
    streams_cut(pods, [(True, "lighthouse"), (False, "glacier")],
                lambda: os.killpg(pods.doomed_child.process.pid, signal.SIGKILL))
    assert "stream continued on" in log_tails(pods.gateway, lines=400)
    mine = await records(pods, 4)
    assert len(mine) == 4  # one per request: two continued, two references
    assert all(r.status == "ok" and r.replica == pods.kept for r in mine), \
        (mine, log_tails(pods.gateway, lines=400))


async def test_a_terminated_pods_streams_go_on_on_the_other_after_its_drain(
        pods: Pods) -> None:
    """SIGTERM to the server process, as Kubernetes stops a pod (its main process only):
    vLLM drains for its --shutdown-timeout (1 s here), then stops what still runs; those
    streams go on on the other pod."""
    pods.restart("--shutdown-timeout", "1")
    time.sleep(3)  # health checks put it back in rotation
    before = len(await records(pods))
    streams_cut(pods, [(True, "orchard"), (False, "harbour")],
                lambda: os.kill(pods.doomed_child.process.pid, signal.SIGTERM))
    mine = (await records(pods, before + 4))[before:]
    assert len(mine) == 4 and all(r.status == "ok" and r.replica == pods.kept for r in mine), \
        (mine, log_tails(pods.gateway, lines=400))
