"""The cluster's load, read from two real SmolLM2 workers' metrics: a worker kept busy by
someone else (here: requests sent to it directly, as another gateway would) gets no new
requests while the other is idle."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from gateway.controlplane.registry import hash_key
from gateway.local_stack import Child
from tests.conftest import free_port
from tests.e2e.conftest import API_KEY
from tests.e2e.processes import (
    kept_busy,
    log_tails,
    start_gateway,
    views,
    wait_idle,
    wait_loads_read,
    worker_load,
)

pytestmark = pytest.mark.e2e
MODEL = "accounts/fireworks/models/pair"
ADMIN_KEY = "fw_test_admin_key_load"


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
                                   prefix_affinity_bytes="0", admin_key=ADMIN_KEY)
    yield f"http://127.0.0.1:{port}"
    gateway.stop()


def test_new_requests_go_to_the_worker_the_cluster_leaves_idle(
        pair_gateway: str, smollm2_worker: str, stock_worker: str) -> None:
    wait_idle(stock_worker, settle=0)  # nothing an earlier test left on the idle one
    with kept_busy(smollm2_worker, streams=3, max_tokens=400):
        wait_loads_read([pair_gateway], ADMIN_KEY, smollm2_worker, stock_worker, 3)
        hosts = []
        for _ in range(6):
            try:  # a minute is ample for one token; if not, the logs say where it stuck
                response = httpx.post(f"{pair_gateway}/inference/v1/completions", timeout=60,
                                      headers={"Authorization": f"Bearer {API_KEY}"},
                                      json={"model": MODEL, "prompt": "Hi", "max_tokens": 1})
            except httpx.TimeoutException:
                pytest.fail("no answer in 60 s; "
                            + views([pair_gateway], ADMIN_KEY, smollm2_worker, stock_worker)
                            + "\n" + log_tails(pair_gateway, stock_worker, smollm2_worker))
            assert response.status_code == 200, response.text
            hosts.append(response.headers["fireworks-backend-host"])
        idle = stock_worker.removeprefix("http://")
        print(f"\nbusy worker: {worker_load(smollm2_worker)} running; requests went to {hosts}")
        assert hosts == [idle] * 6, (views([pair_gateway], ADMIN_KEY, smollm2_worker,
                                           stock_worker) + "\n" + log_tails(pair_gateway))
