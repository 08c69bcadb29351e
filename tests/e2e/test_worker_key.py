"""A worker started with the workers' key answers the gateway only: a real vLLM worker
(`--api-key-file`, engine_plugins/worker_auth.py) and a gateway holding the same key."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from gateway.controlplane.registry import hash_key
from tests.conftest import free_port
from tests.e2e.conftest import API_KEY, MODEL
from tests.e2e.processes import start_gateway, start_worker

KEY = "e2e-workers-key"


@pytest.fixture(scope="module")
def keyed(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[tuple[str, str]]:
    """(gateway URL, worker URL)."""
    folder = tmp_path_factory.mktemp("worker-key")
    key_file = folder / "key"
    key_file.write_text(KEY + "\n")
    port = free_port()
    worker = start_worker(smollm2_dir, port, "--max-model-len", "512", "--served-model-name",
                          "smollm2", "--api-key-file", str(key_file), plugins=False)
    worker_url = f"http://127.0.0.1:{port}"
    registry = folder / "registry.yaml"
    registry.write_text(yaml.safe_dump({
        "accounts": [{"id": "fireworks", "api_keys": [hash_key(API_KEY)]}],
        "deployments": [{"id": "d", "account": "fireworks", "model": MODEL, "default": True,
                         "context_length": 512, "replicas": [{"url": worker_url}]}]}))
    gateway_port = free_port()
    gateway = start_gateway(registry, gateway_port, worker_api_key_file=str(key_file))
    try:
        yield f"http://127.0.0.1:{gateway_port}", worker_url
    finally:
        gateway.stop()
        worker.stop()


def test_only_the_gateway_gets_answers_from_a_keyed_worker(keyed: tuple[str, str]) -> None:
    gateway, worker = keyed
    served = httpx.post(f"{gateway}/inference/v1/completions", timeout=120,
                        headers={"Authorization": f"Bearer {API_KEY}"},
                        json={"model": MODEL, "prompt": "The capital of France is",
                              "max_tokens": 3, "context_length_exceeded_behavior": "error"})
    assert served.status_code == 200, served.text
    assert served.json()["usage"]["completion_tokens"] == 3
    body = {"prompt": "hi", "model": "smollm2", "max_tokens": 1}
    for path, payload in (("/v1/completions", body), ("/tokenize", {"prompt": "hi"}),
                          ("/detokenize", {"tokens": [1]})):
        assert httpx.post(worker + path, json=payload, timeout=60).status_code == 401, path
        wrong = httpx.post(worker + path, json=payload, timeout=60,
                           headers={"Authorization": "Bearer guess"})
        assert wrong.status_code == 401, path
    assert httpx.post(worker + "/tokenize", json={"prompt": "hi"}, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert httpx.get(worker + "/health", timeout=10).status_code == 200
    assert "vllm:num_requests_running" in httpx.get(worker + "/metrics", timeout=10).text
