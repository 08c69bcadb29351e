"""Metrics across server processes: a gateway with two processes (GATEWAY_WORKERS=2, over
a real redis-server and the benchmark's fake upstream) answers every scrape with the sum of
both processes' counts, whichever process takes the scrape."""

from __future__ import annotations

import os
import re
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from gateway.controlplane.registry import hash_key
from gateway.local_stack import Child, wait_healthy
from tests.conftest import free_port
from tests.redis_server import RedisServer

KEY = "k-metrics"
ADMIN = "admin-metrics"
MODEL = "accounts/fireworks/models/fake"


def child(name: str, command: list[str], env: dict[str, str] | None = None) -> Child:
    log = Path(tempfile.mkstemp(prefix=f"{name}-", suffix=".log")[1])
    return Child(name, command, log, env)


@pytest.fixture
def two_processes(tmp_path: Path, redis_server: RedisServer) -> Iterator[tuple[str, Path]]:
    upstream_port, port = free_port(), free_port()
    upstream = child("upstream", [sys.executable, "-m", "bench.fake_upstream",
                                  str(upstream_port)])
    registry = tmp_path / "registry.yaml"
    registry.write_text(yaml.safe_dump({
        "accounts": [{"id": "fireworks", "api_keys": [hash_key(KEY)]}],
        "deployments": [{"id": "fake", "account": "fireworks", "model": MODEL,
                         "default": True, "replicas": [
                             {"url": f"http://127.0.0.1:{upstream_port}"}]}]}))
    shared = tmp_path / "metrics"
    shared.mkdir()
    env = dict(os.environ, GATEWAY_REGISTRY_PATH=str(registry), GATEWAY_PORT=str(port),
               GATEWAY_WORKERS="2", GATEWAY_REDIS_URL=redis_server.url,
               GATEWAY_REDIS_PREFIX=f"m{port}:", GATEWAY_ADMIN_KEY=ADMIN,
               GATEWAY_HEALTH_CHECK_INTERVAL="0", PROMETHEUS_MULTIPROC_DIR=str(shared))
    gateway = child("gateway-2p", [sys.executable, "-m", "gateway", "serve"], env)
    try:
        wait_healthy(upstream, f"http://127.0.0.1:{upstream_port}/health", "upstream", 30)
        wait_healthy(gateway, f"http://127.0.0.1:{port}/health", "the gateway", 60)
        yield f"http://127.0.0.1:{port}", shared
    finally:
        gateway.stop()
        upstream.stop()


def requests_counted(text: str) -> float:
    return sum(float(m.group(1)) for m in re.finditer(
        r'^fwgw_requests_total\{[^}]*code="200"[^}]*\} ([0-9.e+]+)$', text, re.M))


def test_a_scrape_sums_every_process(two_processes: tuple[str, Path]) -> None:
    url, shared = two_processes
    sent = 0

    def counting() -> set[str]:  # the processes that have counted requests
        return {re.sub(r"^counter_(\d+)\.db$", r"\1", f.name)
                for f in shared.glob("counter_*.db")}

    # A new connection each: the processes take turns accepting, unevenly.
    while sent < 40 or (len(counting()) < 2 and sent < 400):
        with httpx.Client() as client:
            answer = client.post(f"{url}/inference/v1/completions", timeout=30,
                                 headers={"Authorization": f"Bearer {KEY}"},
                                 json={"model": MODEL, "prompt": "hi", "max_tokens": 4})
            assert answer.status_code == 200, answer.text
        sent += 1
    assert len(counting()) == 2
    for _ in range(6):  # each scrape on a new connection: either process may answer
        with httpx.Client() as client:
            text = client.get(f"{url}/metrics", timeout=10,
                              headers={"Authorization": f"Bearer {ADMIN}"}).text
        assert requests_counted(text) == sent
        assert "fwgw_requests_in_flight" in text
