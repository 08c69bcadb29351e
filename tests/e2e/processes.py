"""Real processes for end-to-end tests: vLLM workers, the gateway, redis-server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from gateway.local_stack import stop_process_group


class Process:
    """A child in its own process group (vLLM spawns helpers), with its output in a file."""

    def __init__(self, name: str, command: list[str], env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> None:
        self.name = name
        self.log = Path(tempfile.mkstemp(prefix=f"{name}-", suffix=".log")[1])
        with open(self.log, "wb") as out:
            self.popen = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                          env=env, cwd=cwd, start_new_session=True)

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def wait_http(self, url: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.popen.returncode}):\n"
                                   f"{self.tail()}")
            try:
                if httpx.get(url, timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} not ready after {timeout}s:\n{self.tail()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
        stop_process_group(self.popen, timeout, sig)


def start_worker(model_dir: Path, port: int, *extra: str, plugins: bool = True) -> Process:
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    command = [sys.executable, "-m", "engine_plugins.worker", "--model", str(model_dir),
               "--port", str(port), "--dtype", "float32",
               # No torch.compile: starts in seconds instead of minutes on two cores.
               "-O0", *extra]
    if not plugins:
        command.append("--no-plugins")
    worker = Process(f"worker-{port}", command, env)
    worker.wait_http(f"http://127.0.0.1:{port}/health", timeout=600)
    return worker


def start_gateway(registry_path: Path, port: int, **settings: str) -> Process:
    env = dict(os.environ)
    env.update({"GATEWAY_REGISTRY_PATH": str(registry_path), "GATEWAY_PORT": str(port)})
    env.update({f"GATEWAY_{key.upper()}": value for key, value in settings.items()})
    gateway = Process(f"gateway-{port}", [sys.executable, "-m", "gateway", "serve"], env)
    gateway.wait_http(f"http://127.0.0.1:{port}/health", timeout=60)
    return gateway


def start_redis(port: int) -> Process:
    directory = tempfile.mkdtemp(prefix="redis-")
    redis = Process(f"redis-{port}", ["redis-server", "--port", str(port), "--bind",
                                      "127.0.0.1", "--save", "", "--appendonly", "no",
                                      "--dir", directory])
    deadline = time.monotonic() + 20
    import redis as redis_py

    while time.monotonic() < deadline:
        try:
            if redis_py.Redis(port=port).ping():
                return redis
        except redis_py.ConnectionError:
            time.sleep(0.2)
    raise RuntimeError(f"redis-server did not start:\n{redis.tail()}")
