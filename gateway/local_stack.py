"""`make run`: the default model on one vLLM worker plus the gateway, supervised.

Children run in their own process groups so that one signal stops each whole tree (vLLM
spawns engine-core and worker processes); Ctrl-C or SIGTERM stops the gateway first, then
the worker, and waits for both, killing what does not stop in time. Nothing is left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

import httpx
import yaml

from gateway.config import DEFAULT_REGISTRY
from gateway.fireworks.sampling import NEUTRAL

LOCAL_API_KEY = "fw_local_key"  # the key the embedded default registry holds (hashed)
LOCAL_ADMIN_KEY = "fw_local_admin_key"  # the admin API's key, unless GATEWAY_ADMIN_KEY is set
DEFAULT_MODEL = "accounts/fireworks/models/smollm2-135m-instruct"
STOP_GRACE_SECONDS = 20.0


def say(message: str) -> None:
    print(f"[run] {message}", flush=True)


class Stopped(Exception):
    """Raised from the signal handler to unwind into the shutdown path."""


class Child:
    """A supervised child process in its own process group, logging to a file."""

    def __init__(self, name: str, command: list[str], log_path: Path,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                            env=env, start_new_session=True)

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        stop_process_group(self.process, STOP_GRACE_SECONDS)


def stop_process_group(process: subprocess.Popen[bytes], grace: float,
                       sig: int = signal.SIGTERM) -> None:
    """Signal a child started with start_new_session=True and its whole group, wait up to
    `grace` seconds, then kill what is left (grandchildren that outlived their parent too)."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, sig)
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        except ProcessLookupError:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def wait_healthy(child: Child, url: str, what: str, timeout: float) -> None:
    started = time.monotonic()
    last_report = 0.0
    while True:
        if not child.alive():
            raise RuntimeError(f"{child.name} exited with {child.process.returncode} while "
                               f"{what}; last log lines:\n{child.log_tail()}")
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        elapsed = time.monotonic() - started
        if elapsed > timeout:
            raise RuntimeError(f"{child.name} not healthy after {timeout:.0f}s while {what}")
        if elapsed - last_report >= 10.0:
            last_report = elapsed
            say(f"  ... {what} ({elapsed:.0f}s; log: {child.log_path})")
        time.sleep(1.0)


def beside_other_workers(env: dict[str, str]) -> dict[str, str]:
    """The environment of a vLLM CPU worker that shares its machine with other workers.
    vLLM pins each worker's compute thread to the same first cores (VLLM_CPU_OMP_THREADS_BIND
    "auto" knows nothing of the other workers); then a request to an idle worker, beside
    a busy one, waited a minute or more on two cores. Unpinned with one thread each, the system
    spreads them (docs/benchmarks.md, "Workers sharing a machine"). A value already set
    wins."""
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def write_local_registry(data_dir: Path, worker_port: int, model_dir: Path) -> Path:
    """The embedded registry, pointed at these workers (the embedding one on the next port),
    with the generating model's sampling defaults."""
    registry = yaml.safe_load(DEFAULT_REGISTRY.read_text())
    generation = json.loads((model_dir / "generation_config.json").read_text())
    defaults = {k: v for k, v in generation.items() if k in NEUTRAL}
    for deployment in registry["deployments"]:
        if deployment.get("task") == "embed":
            deployment["replicas"] = [{"url": f"http://127.0.0.1:{worker_port + 1}"}]
            continue
        deployment["replicas"] = [{"url": f"http://127.0.0.1:{worker_port}"}]
        deployment["generation_config"] = defaults
    path = data_dir / "registry.local.yaml"
    path.write_text(yaml.safe_dump(registry, sort_keys=False))
    return path


def ready_line(port: int) -> str:
    body = ('{"model": "' + DEFAULT_MODEL + '", "temperature": 0, "messages": '
            '[{"role": "user", "content": "What is the capital of France?"}]}')
    return (f"Ready. Try:\n  curl -s http://127.0.0.1:{port}/inference/v1/chat/completions "
            f"-H 'Authorization: Bearer {LOCAL_API_KEY}' -H 'Content-Type: application/json' "
            f"-d '{body}'")


def run_local_stack(data_dir: Path, port: int, worker_port: int, compile: bool = False) -> int:
    children: list[Child] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        raise Stopped(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    logs = data_dir / "logs"
    try:
        say("preparing the default model (converted once, then cached in "
            f"{data_dir / 'models'})")
        subprocess.run([sys.executable, "-m", "engine_plugins.models", "smollm2",
                        "--data-dir", str(data_dir)], check=True, stdout=subprocess.DEVNULL)
        model_dir = data_dir / "models" / "smollm2-135m-instruct"
        # Without torch.compile the worker is ready in under a minute; compiled, it is about
        # 35% faster per token on CPU but spends two to three minutes compiling at each start.
        compile_flags = [] if compile else ["-O0"]
        say(f"starting the vLLM worker on port {worker_port} with the engine plugins "
            f"({'compiling kernels: about 3 minutes' if compile else 'about a minute'})")
        worker_env = dict(os.environ)
        worker_env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        children.append(Child("vLLM worker", [
            sys.executable, "-m", "engine_plugins.worker", "--model", str(model_dir),
            "--port", str(worker_port), "--dtype", "float32",
            "--served-model-name", "smollm2-135m-instruct", *compile_flags,
        ], logs / "worker.log", worker_env))
        wait_healthy(children[0], f"http://127.0.0.1:{worker_port}/health",
                     "loading the model into vLLM", timeout=900)
        say(f"starting the embedding worker (all-MiniLM-L6-v2) on port {worker_port + 1}")
        subprocess.run([sys.executable, "-m", "engine_plugins.models", "minilm",
                        "--data-dir", str(data_dir)], check=True, stdout=subprocess.DEVNULL)
        children.append(Child("vLLM embedding worker", [
            sys.executable, "-m", "engine_plugins.worker", "--no-plugins",
            "--model", str(data_dir / "models" / "all-minilm-l6-v2"),
            "--port", str(worker_port + 1), "--dtype", "float32", "--runner", "pooling",
            "--served-model-name", "all-minilm-l6-v2", "-O0",
        ], logs / "embedding-worker.log", beside_other_workers(dict(worker_env))))
        wait_healthy(children[1], f"http://127.0.0.1:{worker_port + 1}/health",
                     "loading the embedding model into vLLM", timeout=900)
        say(f"starting the gateway on 127.0.0.1:{port}")
        gateway_env = dict(os.environ)
        gateway_env["GATEWAY_REGISTRY_PATH"] = str(write_local_registry(data_dir, worker_port,
                                                                        model_dir))
        gateway_env["GATEWAY_PORT"] = str(port)
        gateway_env.setdefault("GATEWAY_ADMIN_KEY", LOCAL_ADMIN_KEY)
        children.append(Child("gateway", [sys.executable, "-m", "gateway", "serve"],
                              logs / "gateway.log", gateway_env))
        wait_healthy(children[2], f"http://127.0.0.1:{port}/health", "starting the gateway",
                     timeout=60)
        say(ready_line(port))
        say(f"admin: GATEWAY_ADMIN_KEY={gateway_env['GATEWAY_ADMIN_KEY']} "
            f"GATEWAY_ADMIN_URL=http://127.0.0.1:{port} fireworks-gateway admin --help")
        say(f"logs: {logs}; Ctrl-C stops everything")
        while all(child.alive() for child in children):
            time.sleep(1.0)
        dead = next(child for child in children if not child.alive())
        say(f"{dead.name} exited with {dead.process.returncode}:\n{dead.log_tail()}")
        return 1
    except Stopped as stop:
        say(f"{stop}: stopping")
        return 0
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        say(f"failed: {exc}")
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for child in reversed(children):
            child.stop()
        if children:
            say("all processes stopped")
