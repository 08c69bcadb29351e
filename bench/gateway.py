"""What the gateway adds: `make bench-gateway` (not a timed test).

The same requests straight to the upstream and through the gateway, interleaved in one run,
against a fast fake OpenAI upstream and (with --worker URL) a real vLLM worker; non-streaming
and streaming (64 chunks on the fake); concurrency 1 and 32. Prints requests/s, mean, p50 and
p99 latency and time to first token for each path, the added mean latency and the
throughput ratio against the direct path.

With --redis a second gateway runs on a real redis-server, for an account with rate limits,
so each request also runs the admission and the usage-record scripts: the `gw+redis` rows.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml

from gateway.registry import hash_key
from tests.conftest import free_port

KEY = "fw_bench_key"


@dataclass
class Result:
    rps: float
    latencies: list[float]
    ttfts: list[float]

    def p(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def one(client: httpx.AsyncClient, url: str, body: dict[str, object],
              headers: dict[str, str]) -> tuple[float, float]:
    start = time.perf_counter()
    if not body.get("stream"):
        response = await client.post(url, json=body, headers=headers)
        response.raise_for_status()
        elapsed = time.perf_counter() - start
        return elapsed, elapsed
    first = None
    async with client.stream("POST", url, json=body, headers=headers) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if first is None and line.startswith("data: {"):
                first = time.perf_counter() - start
    return time.perf_counter() - start, first or 0.0


async def run(url: str, body: dict[str, object], headers: dict[str, str],
              concurrency: int, requests: int) -> Result:
    latencies: list[float] = []
    ttfts: list[float] = []
    queue = list(range(requests))
    limits = httpx.Limits(max_connections=concurrency * 2)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def worker() -> None:
            while queue:
                queue.pop()
                latency, ttft = await one(client, url, body, headers)
                latencies.append(latency)
                ttfts.append(ttft)
        start = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        elapsed = time.perf_counter() - start
    return Result(requests / elapsed, latencies, ttfts)


def start(command: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def wait(url: str) -> None:
    for _ in range(100):
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--worker", help="a running vLLM worker to measure too")
    parser.add_argument("--requests", type=int, default=200, help="per fake measurement")
    parser.add_argument("--worker-requests", type=int, default=8)
    parser.add_argument("--worker-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds")
    parser.add_argument("--redis", action="store_true", help="add a gateway on Redis")
    args = parser.parse_args()
    fake_port, gateway_port, redis_gateway_port = free_port(), free_port(), free_port()
    upstreams = {"fake": f"http://127.0.0.1:{fake_port}"}
    if args.worker:
        upstreams["worker"] = args.worker.rstrip("/")
    registry = Path(tempfile.mkdtemp()) / "registry.yaml"
    huge = 10**12  # limits that never refuse but are enforced (both scripts run)
    registry.write_text(yaml.safe_dump({
        "accounts": [{"id": "fireworks", "api_keys": [hash_key(KEY)],
                      "limits": {"requests_per_minute": huge, "generated_tokens_per_minute": huge,
                                 "prompt_tokens_per_minute": huge,
                                 "concurrent_requests": huge}}],
        "deployments": [{"id": name, "account": "fireworks",
                         "model": f"accounts/fireworks/models/{name}", "default": True,
                         "context_length": 2048, "replicas": [{"url": url}]}
                        for name, url in upstreams.items()]}))
    env = dict(os.environ, GATEWAY_REGISTRY_PATH=str(registry), GATEWAY_PORT=str(gateway_port),
               GATEWAY_LOG_LEVEL="warning")
    processes = [start([sys.executable, "-m", "bench.fake_upstream", str(fake_port)]),
                 start([sys.executable, "-m", "gateway", "serve"], env)]
    gateways = {"gateway": f"http://127.0.0.1:{gateway_port}"}
    redis_server = None
    if args.redis:
        from tests.redis_server import RedisServer

        redis_server = RedisServer()
        redis_server.start()
        processes.append(start([sys.executable, "-m", "gateway", "serve"], env | {
            "GATEWAY_PORT": str(redis_gateway_port), "GATEWAY_REDIS_URL": redis_server.url}))
        gateways["gw+redis"] = f"http://127.0.0.1:{redis_gateway_port}"
    try:
        wait(f"{upstreams['fake']}/health")
        for url in gateways.values():
            wait(f"{url}/health")
        rows = []
        for name, upstream in upstreams.items():
            count = args.requests if name == "fake" else args.worker_requests
            for stream in (False, True):
                for concurrency in (1, 32):
                    # 64 chunks from the fake; fewer from a real CPU worker, to stay short.
                    tokens = 64 if name == "fake" else args.worker_tokens
                    body: dict[str, object] = {"prompt": "Hello there", "max_tokens": tokens,
                                               "temperature": 0, "ignore_eos": True,
                                               "stream": stream}
                    results: dict[str, list[Result]] = {"direct": []}
                    for _ in range(args.rounds):  # interleaved: direct, gateway, direct, ...
                        results["direct"].append(asyncio.run(run(
                            f"{upstream}/v1/completions", body, {}, concurrency, count)))
                        for path, url in gateways.items():
                            results.setdefault(path, []).append(asyncio.run(run(
                                f"{url}/v1/completions",
                                body | {"model": f"accounts/fireworks/models/{name}"},
                                {"Authorization": f"Bearer {KEY}"}, concurrency, count)))
                    rows.append((name, "stream" if stream else "json", concurrency,
                                 {path: merge(r) for path, r in results.items()}))
        print_table(rows)
    finally:
        for process in processes:
            process.terminate()
            process.wait()
        if redis_server is not None:
            redis_server.stop()


def merge(results: list[Result]) -> Result:
    return Result(statistics.mean(r.rps for r in results),
                  [x for r in results for x in r.latencies],
                  [x for r in results for x in r.ttfts])


def print_table(rows: list[tuple[str, str, int, dict[str, Result]]]) -> None:
    header = (f"{'upstream':<8} {'mode':<6} {'conc':>4} | {'path':<8} {'req/s':>8} "
              f"{'mean ms':>8} {'p50 ms':>8} {'p99 ms':>8} {'ttft ms':>8} | "
              f"{'added ms':>8} {'ratio':>6}")
    print(header)
    print("-" * len(header))
    for name, mode, concurrency, results in rows:
        direct = results["direct"]
        for label, r in results.items():
            line = (f"{name:<8} {mode:<6} {concurrency:>4} | {label:<8} {r.rps:>8.1f} "
                    f"{statistics.mean(r.latencies) * 1e3:>8.2f} {r.p(0.5) * 1e3:>8.2f} "
                    f"{r.p(0.99) * 1e3:>8.2f} {statistics.mean(r.ttfts) * 1e3:>8.2f} |")
            if label != "direct":
                added = (statistics.mean(r.latencies) - statistics.mean(
                    direct.latencies)) * 1e3
                line += f" {added:>8.2f} {r.rps / direct.rps:>6.3f}"
            print(line)


if __name__ == "__main__":
    main()
