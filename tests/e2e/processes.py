"""Real processes for end-to-end tests: vLLM workers and the gateway."""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from gateway.dataplane.load import parse_load
from gateway.local_stack import Child, beside_other_workers, wait_healthy


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


def start_worker(model_dir: Path, port: int, *extra: str, plugins: bool = True,
                 env: dict[str, str] | None = None) -> Child:
    """`env`: the worker's whole environment (by default this one, for a worker beside
    others: the tests run up to four at once)."""
    env = beside_other_workers(dict(os.environ)) if env is None else env
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


def replica_gauge(gateway: str, admin_key: str, name: str, replica: str) -> float | None:
    """One of a gateway's per-replica gauges (fwgw_replica_load: the load its choices
    read; fwgw_replica_healthy)."""
    text = httpx.get(f"{gateway}/metrics", timeout=10,
                     headers={"Authorization": f"Bearer {admin_key}"}).text
    sample = f'fwgw_{name}{{replica="{replica}"}} '
    return next((float(line.removeprefix(sample)) for line in text.splitlines()
                 if line.startswith(sample)), None)


def views(gateways: list[str], admin_key: str, *workers: str) -> str:
    """What the gateways and the workers say of the workers' load: a failure's message
    (one that does not answer says so)."""
    def ask(question: Callable[..., object], *args: str) -> str:
        try:
            return str(question(*args))
        except httpx.HTTPError as error:
            return f"no answer ({error!r})"

    return "; ".join(
        f"{w} reports {ask(worker_load, w)}, " + ", ".join(
            f"{g} reads load {ask(replica_gauge, g, admin_key, 'replica_load', w)} "
            f"healthy {ask(replica_gauge, g, admin_key, 'replica_healthy', w)}"
            for g in gateways) for w in workers)


def wait_loads_read(gateways: list[str], admin_key: str, busy: str, idle: str,
                    busy_at_least: int) -> None:
    """Until every gateway's choices read `busy` at `busy_at_least` or more and `idle` at 0
    (health checks run every few tenths of a second, slower on a loaded machine)."""
    deadline = time.monotonic() + 60
    while any((replica_gauge(g, admin_key, "replica_load", busy) or 0) < busy_at_least
              or replica_gauge(g, admin_key, "replica_load", idle) != 0 for g in gateways):
        assert time.monotonic() < deadline, (
            "the gateways never read the busy worker busy and the idle one idle: "
            + views(gateways, admin_key, busy, idle))
        time.sleep(0.1)


@contextmanager
def kept_busy(worker: str, streams: int, max_tokens: int) -> Iterator[None]:
    """`streams` long streams on the worker, sent to it directly (as another gateway or
    client would), started again as each ends, until the block ends."""
    stop = threading.Event()

    def stream() -> None:
        while not stop.is_set():
            with httpx.stream("POST", f"{worker}/v1/completions", timeout=120, json={
                    "prompt": "Once upon a time", "max_tokens": max_tokens,
                    "ignore_eos": True, "stream": True}) as response:
                for _ in response.iter_lines():
                    if stop.is_set():
                        break

    threads = [threading.Thread(target=stream, daemon=True) for _ in range(streams)]
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
