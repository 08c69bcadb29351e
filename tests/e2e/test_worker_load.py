"""The cluster's load, read from two real SmolLM2 workers' metrics: a worker kept busy by
someone else (here: requests sent to it directly, as another gateway would) gets no new
requests while the other is idle."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from gateway.controlplane.registry import hash_key
from gateway.dataplane.load import parse_load
from gateway.local_stack import Child
from tests.conftest import free_port
from tests.e2e.conftest import API_KEY
from tests.e2e.processes import log_tails, start_gateway

pytestmark = pytest.mark.e2e
MODEL = "accounts/fireworks/models/pair"


@pytest.fixture(scope="module")
def pair_gateway(smollm2_worker: str, stock_worker: str,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    registry = tmp_path_factory.mktemp("load") / "registry.yaml"
    registry.write_text(yaml.safe_dump({
        "accounts": [{"id": "fireworks", "api_keys": [hash_key(API_KEY)]}],
        "deployments": [{"id": "pair", "account": "fireworks", "model": MODEL,
                         "default": True, "context_length": 2048,
                         "replicas": [{"url": smollm2_worker}, {"url": stock_worker}]}]}))
    port = free_port()
    # No key derived from the prompt: these requests go where the load says.
    gateway: Child = start_gateway(Path(registry), port, health_check_interval="0.3",
                                   prefix_affinity_bytes="0")
    yield f"http://127.0.0.1:{port}"
    gateway.stop()


def running(worker: str) -> int:
    load = parse_load(httpx.get(f"{worker}/metrics", timeout=10).text)
    assert load is not None
    return load.running + load.waiting


def test_new_requests_go_to_the_worker_the_cluster_leaves_idle(
        pair_gateway: str, smollm2_worker: str, stock_worker: str) -> None:
    stop = threading.Event()

    def keep_busy() -> None:  # another client of the busy worker, not through this gateway
        while not stop.is_set():
            with httpx.stream("POST", f"{smollm2_worker}/v1/completions", timeout=120, json={
                    "prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True,
                    "stream": True}) as response:
                for _ in response.iter_lines():
                    if stop.is_set():
                        break

    threads = [threading.Thread(target=keep_busy, daemon=True) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        deadline = time.monotonic() + 60
        while running(smollm2_worker) < 3:
            assert time.monotonic() < deadline, "the busy worker never got busy"
            time.sleep(0.1)
        time.sleep(1.0)  # a few health-check rounds read it
        hosts = []
        for _ in range(6):
            try:  # a minute is ample for one token; if not, the logs say where it stuck
                response = httpx.post(f"{pair_gateway}/inference/v1/completions", timeout=60,
                                      headers={"Authorization": f"Bearer {API_KEY}"},
                                      json={"model": MODEL, "prompt": "Hi", "max_tokens": 1})
            except httpx.TimeoutException:
                pytest.fail("no answer in 60 s; busy worker: "
                            f"{running(smollm2_worker)} running, idle worker: "
                            f"{running(stock_worker)}\n"
                            + log_tails(pair_gateway, stock_worker, smollm2_worker))
            assert response.status_code == 200, response.text
            hosts.append(response.headers["fireworks-backend-host"])
        idle = stock_worker.removeprefix("http://")
        print(f"\nbusy worker: {running(smollm2_worker)} running; requests went to {hosts}")
        assert hosts == [idle] * 6
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
