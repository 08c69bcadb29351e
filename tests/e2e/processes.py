"""Real processes for end-to-end tests: vLLM workers and the gateway."""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import httpx

from gateway.dataplane.load import parse_load
from gateway.local_stack import Child, wait_healthy


def _child(name: str, command: list[str], env: dict[str, str] | None = None) -> Child:
    """A child in its own process group (vLLM spawns helpers), logging to a temp file."""
    log = Path(tempfile.mkstemp(prefix=f"{name}-", suffix=".log")[1])
    return Child(name, command, log, env)


def log_tails(*urls: str, lines: int = 40) -> str:
    """The last lines of the logs of the children serving `urls` (their ports name the log
    files): what a failed test prints, so that a failure in CI can be read afterwards."""
    tails = []
    for url in urls:
        port = url.rsplit(":", 1)[-1]
        for kind in ("gateway", "worker"):
            for log in Path(tempfile.gettempdir()).glob(f"{kind}-{port}-*.log"):
                text = log.read_text(errors="replace").splitlines()[-lines:]
                tails.append(f"--- {log.name} ---\n" + "\n".join(text))
    return "\n".join(tails)


def start_worker(model_dir: Path, port: int, *extra: str, plugins: bool = True) -> Child:
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    command = [sys.executable, "-m", "engine_plugins.worker", "--model", str(model_dir),
               "--port", str(port), "--dtype", "float32",
               # No torch.compile: starts in seconds instead of minutes on two cores.
               "-O0", *extra]
    if not plugins:
        command.append("--no-plugins")
    worker = _child(f"worker-{port}", command, env)
    wait_healthy(worker, f"http://127.0.0.1:{port}/health", "starting a vLLM worker", 600)
    return worker


def start_gateway(registry_path: Path, port: int, **settings: str) -> Child:
    env = dict(os.environ)
    env.update({"GATEWAY_REGISTRY_PATH": str(registry_path), "GATEWAY_PORT": str(port)})
    env.update({f"GATEWAY_{key.upper()}": value for key, value in settings.items()})
    gateway = _child(f"gateway-{port}", [sys.executable, "-m", "gateway", "serve"], env)
    wait_healthy(gateway, f"http://127.0.0.1:{port}/health", "starting the gateway", 60)
    return gateway


def worker_load(worker: str) -> int:
    """Requests running and waiting on a real worker, from its own metrics."""
    load = parse_load(httpx.get(f"{worker}/metrics", timeout=10).text)
    assert load is not None, f"{worker} reports no vLLM load"
    return load.running + load.waiting


def wait_idle(worker: str, settle: float = 1.0) -> None:
    """Until the worker runs nothing (what an earlier test left), then `settle` seconds more
    for the gateways' health checks to read so."""
    deadline = time.monotonic() + 60
    while worker_load(worker):
        assert time.monotonic() < deadline, f"{worker} stays busy"
        time.sleep(0.2)
    time.sleep(settle)
