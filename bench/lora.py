"""What engine_plugins/lora_rows.py costs: rounds of 9 requests at once (3 prompts x {base,
an attention adapter, an MLP adapter}, 32 tokens each) on a SmolLM2 worker with two LoRA
slots, with the correction and without it (stock vLLM, whose base answers in these rounds
are wrong). The same worker setup as tests/e2e/test_loras.py.

    make bench-lora
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from engine_plugins.lora_rows import DISABLE_ENV
from engine_plugins.models import prepare_smollm2
from tests.conftest import free_port
from tests.e2e.processes import start_worker
from tests.e2e.test_loras import ADAPTERS, PROMPTS, WORKER_ARGS, make_adapter

TOKENS = 32


def rounds(url: str, count: int) -> list[float]:
    asks = [(model, prompt) for prompt in PROMPTS for model in ("smollm2", "attn", "mlp")]

    def one(ask: tuple[str, str]) -> int:
        response = httpx.post(f"{url}/v1/completions", timeout=300, json={
            "model": ask[0], "prompt": ask[1], "max_tokens": TOKENS, "temperature": 0,
            "ignore_eos": True})
        response.raise_for_status()
        return int(response.json()["usage"]["completion_tokens"])

    seconds = []
    for _ in range(count + 1):  # the first round warms up
        started = time.perf_counter()
        with ThreadPoolExecutor(len(asks)) as pool:
            assert sum(pool.map(one, asks)) == len(asks) * TOKENS
        seconds.append(time.perf_counter() - started)
    return seconds[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", type=Path, default=Path(".data"))
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    model = prepare_smollm2(args.data_dir)
    scratch = Path(tempfile.mkdtemp(prefix="bench-lora-"))
    adapters = {name: make_adapter(model, scratch / name, targets, seed, rank=4, scale=0.2)
                for name, (targets, seed) in ADAPTERS.items() if name in ("attn", "mlp")}
    print(f"{'engine':<28}{'median s/round':>16}{'tokens/s':>10}")
    for label, switch in (("with lora_rows", "on"), ("stock (base answers wrong)", "off")):
        os.environ[DISABLE_ENV] = switch
        port = free_port()
        worker = start_worker(model, port, *WORKER_ARGS)
        url = f"http://127.0.0.1:{port}"
        try:
            for name, path in adapters.items():
                httpx.post(f"{url}/v1/load_lora_adapter", timeout=120,
                           json={"lora_name": name, "lora_path": str(path)}).raise_for_status()
            median = statistics.median(rounds(url, args.rounds))
        finally:
            worker.stop()
        print(f"{label:<28}{median:>16.2f}{9 * TOKENS / median:>10.0f}")


if __name__ == "__main__":
    main()
