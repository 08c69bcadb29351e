"""Real processes for end-to-end tests: vLLM workers and the gateway."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from gateway.local_stack import Child, wait_healthy


def _child(name: str, command: list[str], env: dict[str, str] | None = None) -> Child:
    """A child in its own process group (vLLM spawns helpers), logging to a temp file."""
    log = Path(tempfile.mkstemp(prefix=f"{name}-", suffix=".log")[1])
    return Child(name, command, log, env)


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
