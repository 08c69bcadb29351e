"""Routing on what each pod really has cached, from real workers' KV-cache events: a prefix
cached on one of two pods by a request sent to that pod directly (not through the gateway,
so no hash of the gateway's could know) draws the gateway's requests with that prefix, 8
prefixes of 8; after a pod restarts, its old blocks no longer draw anything."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from gateway.controlplane.registry import hash_key
from gateway.dataplane.isolation import account_salt
from gateway.local_stack import Child
from tests.conftest import free_port, free_port_pair
from tests.e2e.conftest import API_KEY, KV_EVENTS
from tests.e2e.processes import log_tails, start_gateway, start_worker

pytestmark = pytest.mark.e2e
MODEL = "accounts/fireworks/models/cached"
ACCOUNT = "fireworks"


SALT = account_salt(ACCOUNT, "")  # what the gateway sends for this account


@dataclass
class Pods:
    gateway: str
    urls: list[str]
    restart: Callable[[], None]  # the second pod: stopped, started again empty


def start_events_worker(model_dir: Path, port: int, events: int) -> Child:
    return start_worker(model_dir, port, "--max-model-len", "2048", "--served-model-name",
                        "smollm2", "--kv-events-port", str(events))


@pytest.fixture(scope="module")
def pods(smollm2_worker: str, smollm2_dir: Path,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pods]:
    if smollm2_worker not in KV_EVENTS:
        pytest.fail("the session worker publishes no KV events (E2E_REUSE_WORKER?)")
    port, events = free_port(), free_port_pair()
    second = f"http://127.0.0.1:{port}"
    children = [start_events_worker(smollm2_dir, port, events)]
    registry = tmp_path_factory.mktemp("kv") / "registry.yaml"
    registry.write_text(yaml.safe_dump({
        "accounts": [{"id": ACCOUNT, "api_keys": [hash_key(API_KEY)]}],
        "deployments": [{"id": "cached", "account": ACCOUNT, "model": MODEL, "default": True,
                         "context_length": 2048, "replicas": [
                             {"url": smollm2_worker, "kv_events": KV_EVENTS[smollm2_worker]},
                             {"url": second, "kv_events": f"tcp://127.0.0.1:{events}"}]}]}))
    gateway_port = free_port()
    gateway = start_gateway(registry, gateway_port, health_check_interval="0.3",
                            discovery_interval="0.5")

    def restart() -> None:
        children[0].stop()
        children[0] = start_events_worker(smollm2_dir, port, events)

    yield Pods(f"http://127.0.0.1:{gateway_port}", [smollm2_worker, second], restart)
    gateway.stop()
    children[0].stop()


def document(i: int) -> str:
    """A long prefix of its own (several 16-token blocks)."""
    words = " ".join(f"item{i}-{j}" for j in range(40))
    return f"Document {i} lists these words: {words}. "


def warm(pod: str, prefix: str) -> None:
    """Cache the prefix on one pod, as another client of that pod would."""
    answer = httpx.post(f"{pod}/v1/completions", timeout=60, json={
        "model": "smollm2", "prompt": prefix, "max_tokens": 1, "cache_salt": SALT})
    assert answer.status_code == 200, answer.text


def ask(gateway: str, prompt: str) -> httpx.Response:
    answer = httpx.post(f"{gateway}/inference/v1/completions", timeout=60,
                        headers={"Authorization": f"Bearer {API_KEY}"},
                        json={"model": MODEL, "prompt": prompt, "max_tokens": 1})
    assert answer.status_code == 200, answer.text
    return answer


def test_requests_go_where_their_prefix_is_cached(pods: Pods) -> None:
    time.sleep(1.5)  # the gateway has subscribed to both pods
    chosen, expected = [], []
    for i in range(8):
        pod = pods.urls[(i * 5 + 1) % 3 % 2]  # both pods, in no order a hash would follow
        warm(pod, document(i))
        time.sleep(0.3)  # the pod's event reaches the gateway
        answer = ask(pods.gateway, document(i) + "Which word comes first?")
        chosen.append(answer.headers["fireworks-backend-host"])
        expected.append(pod.removeprefix("http://"))
        routing = answer.headers.get("fireworks-routing", "")
        assert routing.startswith("cached-blocks=") and not \
            routing.startswith("cached-blocks=0/"), routing
    assert chosen == expected, log_tails(pods.gateway)


def test_a_restarted_pod_draws_nothing_with_its_old_blocks(pods: Pods) -> None:
    restarted = pods.urls[1]
    prefix = document(100)
    warm(restarted, prefix)
    time.sleep(0.3)
    before = ask(pods.gateway, prefix + "Which word comes last?")
    assert before.headers["fireworks-backend-host"] == restarted.removeprefix("http://")
    pods.restart()  # the same port, an empty cache
    warm(restarted, document(200))  # full blocks: the new pod publishes events
    time.sleep(1.0)
    assert "restarted: its cached blocks are forgotten" in log_tails(pods.gateway, lines=400)
    after = ask(pods.gateway, prefix + "Which word comes last?")
    assert after.headers["fireworks-routing"].startswith("cached-blocks=0/"), \
        after.headers["fireworks-routing"]
