"""Workers sharing one machine: a request to an idle worker while another is kept busy.

Three real vLLM CPU workers (SmolLM2 with the plugins, SmolLM2 stock, the tiny Llama) run on
this machine. Four streams keep the first busy; one client sends short completions in turn
to the other two for a fixed time. Two settings, one after the other in one run:
- `pinned`: vLLM's default, VLLM_CPU_OMP_THREADS_BIND=auto, which pins every worker's
  compute thread to the same first core;
- `beside`: gateway.local_stack.beside_other_workers, unpinned with one thread each (what
  `make run`'s embedding worker and the tests' workers use).

    .venv/bin/python -m bench.shared_host --seconds 150
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time

import httpx

from engine_plugins.models import prepare_smollm2, prepare_tiny
from gateway.local_stack import beside_other_workers
from tests.conftest import DATA_DIR, free_port
from tests.e2e.processes import kept_busy, start_worker

SETTINGS = {
    "pinned": lambda: {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    | {"VLLM_CPU_OMP_THREADS_BIND": "auto"},
    "beside": lambda: beside_other_workers(
        {k: v for k, v in os.environ.items()
         if k not in ("OMP_NUM_THREADS", "VLLM_CPU_OMP_THREADS_BIND")}),
}


def run(setting: str, seconds: float) -> dict[str, list[float]]:
    smollm2, tiny = prepare_smollm2(DATA_DIR), prepare_tiny(DATA_DIR)
    ports = [free_port() for _ in range(3)]
    workers = [
        start_worker(smollm2, ports[0], "--max-model-len", "2048", env=SETTINGS[setting]()),
        start_worker(smollm2, ports[1], "--max-model-len", "2048", plugins=False,
                     env=SETTINGS[setting]()),
        start_worker(tiny, ports[2], "--max-model-len", "128", plugins=False,
                     env=SETTINGS[setting]())]
    busy, *idle = (f"http://127.0.0.1:{p}" for p in ports)
    seen: dict[str, list[float]] = {"smollm2 stock": [], "tiny": []}
    end = time.monotonic() + seconds
    try:
        with kept_busy(busy, streams=4, max_tokens=300):
            while time.monotonic() < end:
                for name, url in zip(seen, idle, strict=True):
                    started = time.monotonic()
                    with contextlib.suppress(httpx.TimeoutException):  # counted at 120 s
                        httpx.post(f"{url}/v1/completions", timeout=120,
                                   json={"prompt": "Hi", "max_tokens": 4})
                    seen[name].append(time.monotonic() - started)
    finally:
        for worker in workers:
            worker.stop()
    return seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=150)
    seconds = parser.parse_args().seconds
    rows = []
    for setting in SETTINGS:
        for name, times in run(setting, seconds).items():
            times.sort()
            rows.append(f"| {setting} | {name} | {len(times)} | {times[len(times) // 2]:.2f} | "
                        f"{times[-1]:.1f} | {sum(t > 10 for t in times)} |")
    print(f"\nidle workers beside a busy one, {seconds:.0f} s each\n")
    print("| setting | idle worker | requests | p50 s | max s | over 10 s |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
