"""Session-wide real parts: one SmolLM2 worker with the engine plugins, one gateway."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from gateway.controlplane.registry import hash_key
from gateway.local_stack import Child
from tests.conftest import free_port, free_port_pair
from tests.e2e.processes import start_gateway, start_worker

API_KEY = "fw_test_key"
OTHER_KEY = "fw_other_account_key"
MODEL = "accounts/fireworks/models/smollm2-135m-instruct"


@dataclass
class Stack:
    base_url: str  # the gateway, e.g. http://127.0.0.1:PORT
    worker_url: str
    api_key: str = API_KEY
    model: str = MODEL

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}


@pytest.fixture(scope="session")
def smollm2_dir(data_dir: Path) -> Path:
    from engine_plugins.models import prepare_smollm2

    return prepare_smollm2(data_dir)


# Developer convenience: E2E_REUSE_WORKER=http://127.0.0.1:8001 runs the tests against a
# worker already running (with the plugins, -O0, --max-model-len 2048) instead of starting one.
REUSE_WORKER = os.environ.get("E2E_REUSE_WORKER")
# Where each worker started here publishes its KV-cache events (worker URL -> endpoint).
KV_EVENTS: dict[str, str] = {}


@pytest.fixture(scope="session")
def smollm2_worker(smollm2_dir: Path) -> Iterator[str]:
    if REUSE_WORKER:
        yield REUSE_WORKER
        return
    port, events = free_port(), free_port_pair()
    # The hermes tool parser: requests with tools go to the smollm2-tools deployment.
    worker = start_worker(smollm2_dir, port, "--max-model-len", "2048",
                          "--served-model-name", "smollm2", "--enable-auto-tool-choice",
                          "--tool-call-parser", "hermes", "--kv-events-port", str(events))
    KV_EVENTS[f"http://127.0.0.1:{port}"] = f"tcp://127.0.0.1:{events}"
    yield f"http://127.0.0.1:{port}"
    worker.stop()


def write_registry(path: Path, worker_url: str) -> Path:
    registry = {
        "accounts": [
            {"id": "fireworks", "api_keys": [hash_key(API_KEY)]},
            {"id": "other", "api_keys": [hash_key(OTHER_KEY)]},
        ],
        "deployments": [
            {"id": "smollm2-135m-instruct", "account": "fireworks", "model": MODEL,
             "default": True, "context_length": 2048, "replicas": [{"url": worker_url}]},
            {"id": "smollm2-defaults", "account": "fireworks",
             "model": "accounts/fireworks/models/smollm2-defaults", "default": True,
             "context_length": 2048, "max_tokens_chat": 7, "max_tokens_completion": 5,
             "generation_config": {"temperature": 0.0, "top_k": 7},
             "replicas": [{"url": worker_url}]},
            {"id": "smollm2-tools", "account": "fireworks",
             "model": "accounts/fireworks/models/smollm2-tools", "default": True,
             "context_length": 2048, "tool_parser": "hermes",
             "replicas": [{"url": worker_url}]},
            {"id": "dead", "account": "fireworks", "model": "accounts/fireworks/models/dead",
             "default": True, "replicas": [{"url": f"http://127.0.0.1:{free_port()}"}]},
            {"id": "private-smollm2", "account": "other",
             "model": "accounts/other/models/private", "default": True,
             "context_length": 2048, "replicas": [{"url": worker_url}]},
        ],
    }
    path.write_text(yaml.safe_dump(registry))
    return path


@pytest.fixture(scope="session")
def stack(smollm2_worker: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    registry = write_registry(tmp_path_factory.mktemp("gateway") / "registry.yaml",
                              smollm2_worker)
    port = free_port()
    gateway: Child = start_gateway(registry, port)
    yield Stack(base_url=f"http://127.0.0.1:{port}", worker_url=smollm2_worker)
    gateway.stop()


@pytest.fixture(scope="session")
def stock_worker(smollm2_dir: Path) -> Iterator[str]:
    """The same model on stock vLLM, without the engine plugins."""
    port = free_port()
    worker = start_worker(smollm2_dir, port, "--max-model-len", "2048",
                          "--served-model-name", "smollm2", plugins=False)
    yield f"http://127.0.0.1:{port}"
    worker.stop()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """LangChain's standard suite (test_langchain_standard.py): the tests it would skip by
    design for this model are not collected (a skip fails CI), and those the model is too
    small for are strict expected failures, each with its reason."""
    kept, dropped = [], []
    for item in items:
        module = getattr(item, "module", None)
        not_applicable = getattr(module, "NOT_APPLICABLE", {})
        model_size = getattr(module, "MODEL_SIZE", {})
        name = getattr(item, "originalname", item.name)
        if name in not_applicable:
            dropped.append(item)
            continue
        reason = model_size.get(item.name) or model_size.get(name)  # one case, or all
        if reason is not None:
            item.add_marker(pytest.mark.xfail(strict=True, reason=reason))
        kept.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept
