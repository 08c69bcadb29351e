"""What the gateway costs, side by side with vllm-router: `make bench-gateway` (not a test).

The same requests go straight to a fast fake OpenAI upstream, through the gateway, and
through vllm-router (the Rust router, installed by the Makefile into its own environment),
interleaved in rounds in one run. For each case the table gives requests/s, p50/p99 latency
and what each proxy adds to the direct path, and the proxy's CPU per request (user + system
time of its process tree and threads, from /proc's schedstat) with its ratio to
vllm-router's. Cases: plain requests and 64-chunk streams at concurrency 1 and 32, and a
plain request with a 200 KB prompt. With --worker URL the gateway is also measured over a
real vLLM worker.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import httpx
import yaml

from gateway.controlplane.registry import hash_key
from tests.conftest import free_port

KEY = "fw_bench_key"
MODEL = "accounts/fireworks/models/fake"


@dataclass
class Case:
    name: str
    stream: bool
    concurrency: int
    requests: int
    prompt: str = "Hello there"
    chunks: int = 64  # what the fake upstream streams


@dataclass
class Sample:
    latencies: list[float] = field(default_factory=list)
    seconds: float = 0.0  # wall time
    cpu: float = 0.0  # the proxy's CPU seconds
    requests: int = 0

    def add(self, other: Sample) -> None:
        self.latencies += other.latencies
        self.seconds += other.seconds
        self.cpu += other.cpu
        self.requests += other.requests

    def p(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3


def tree_cpu(pid: int) -> float:
    """Seconds on a CPU (user + system, nanosecond resolution from schedstat) of a process,
    its threads and all its descendants (uvicorn's worker processes)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(parent, []).append(int(entry))
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        try:
            threads = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue
        for thread in threads:
            try:
                with open(f"/proc/{current}/task/{thread}/schedstat") as f:
                    total += int(f.read().split()[0])
            except OSError:
                continue
        todo += children.get(current, [])
    return total / 1e9


async def one(session: aiohttp.ClientSession, url: str, body: dict[str, object],
              headers: dict[str, str]) -> float:
    start = time.perf_counter()
    async with session.post(url, json=body, headers=headers) as response:
        if response.status != 200:
            raise RuntimeError(f"{url}: {response.status} {await response.text()}")
        if body.get("stream"):
            done = False
            async for line in response.content:
                done = done or line.startswith(b"data: [DONE]")
            if not done:
                raise RuntimeError(f"{url}: the stream did not end with [DONE]")
        else:
            await response.read()
    return time.perf_counter() - start


async def measure(url: str, body: dict[str, object], headers: dict[str, str], case: Case,
                  pid: int | None) -> Sample:
    sample = Sample(requests=case.requests)
    remaining = case.requests
    connector = aiohttp.TCPConnector(limit=case.concurrency * 2)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=600)) as session:
        await one(session, url, body, headers)  # warm the connection

        async def client() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                sample.latencies.append(await one(session, url, body, headers))

        cpu = tree_cpu(pid) if pid else 0.0
        start = time.perf_counter()
        await asyncio.gather(*[client() for _ in range(case.concurrency)])
        sample.seconds = time.perf_counter() - start
        sample.cpu = (tree_cpu(pid) - cpu) if pid else 0.0
    return sample


def start(command: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def start_router(executable: str, port: int, upstream: str) -> subprocess.Popen[bytes]:
    """vllm-router in front of one upstream, as lean as it runs: no retries, no checks."""
    return start([executable, "--host", "127.0.0.1", "--port", str(port),
                  "--worker-urls", upstream, "--policy", "round_robin", "--log-level",
                  "warning", "--disable-retries", "--health-check-interval-secs", "3600"])


def wait(url: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up")


def wait_all(upstream: str, proxies: Mapping[str, tuple[str, int | None]]) -> None:
    """Until the upstream and every proxy answer /health."""
    wait(f"{upstream}/health")
    for url, _ in proxies.values():
        wait(f"{url}/health")


def registry_file(upstreams: dict[str, str]) -> Path:
    registry = Path(tempfile.mkdtemp()) / "registry.yaml"
    registry.write_text(yaml.safe_dump({
        "accounts": [{"id": "fireworks", "api_keys": [hash_key(KEY)]}],
        "deployments": [{"id": name, "account": "fireworks",
                         "model": f"accounts/fireworks/models/{name}", "default": True,
                         "context_length": 1 << 20, "replicas": [{"url": url}]}
                        for name, url in upstreams.items()]}))
    return registry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--router", default=".bench/router/bin/vllm-router",
                        help="the vllm-router executable ('' to leave it out)")
    parser.add_argument("--gateway-src", default=".",
                        help="the checkout whose gateway to run (for before/after numbers)")
    parser.add_argument("--before-src",
                        help="another checkout whose gateway is measured in the same rounds "
                             "(rows 'before')")
    parser.add_argument("--gateway-workers", type=int, default=1)
    parser.add_argument("--requests", type=int, default=1000, help="per plain measurement")
    parser.add_argument("--streams", type=int, default=300, help="per stream measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--worker", help="a running vLLM worker to measure the gateway over")
    parser.add_argument("--worker-requests", type=int, default=16)
    parser.add_argument("--worker-tokens", type=int, default=32)
    args = parser.parse_args()

    fake_port, gateway_port, router_port = free_port(), free_port(), free_port()
    fake = f"http://127.0.0.1:{fake_port}"
    upstreams = {"fake": fake} | ({"worker": args.worker.rstrip("/")} if args.worker else {})
    env = dict(os.environ, GATEWAY_REGISTRY_PATH=str(registry_file(upstreams)),
               GATEWAY_PORT=str(gateway_port), GATEWAY_LOG_LEVEL="warning",
               GATEWAY_HEALTH_CHECK_INTERVAL="0", GATEWAY_WORKERS=str(args.gateway_workers))
    processes = [start([sys.executable, "-m", "bench.fake_upstream", str(fake_port)])]
    gateway = subprocess.Popen([sys.executable, "-m", "gateway", "serve"], env=env,
                               cwd=args.gateway_src, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    processes.append(gateway)
    proxies: dict[str, tuple[str, int | None]] = {
        "gateway": (f"http://127.0.0.1:{gateway_port}", gateway.pid)}
    if args.before_src:
        before_port = free_port()
        before = subprocess.Popen([sys.executable, "-m", "gateway", "serve"],
                                  env=dict(env, GATEWAY_PORT=str(before_port)),
                                  cwd=args.before_src, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        processes.append(before)
        proxies["before"] = (f"http://127.0.0.1:{before_port}", before.pid)
    if args.router:
        router = start_router(args.router, router_port, fake)
        processes.append(router)
        proxies["router"] = (f"http://127.0.0.1:{router_port}", router.pid)
    try:
        wait_all(fake, proxies)
        cases = [Case("plain", False, 1, args.requests), Case("plain", False, 32, args.requests),
                 Case("stream", True, 1, args.streams), Case("stream", True, 32, args.streams),
                 Case("200KB prompt", False, 1, args.requests // 4, prompt="x" * 200_000)]
        headers = {"Authorization": f"Bearer {KEY}"}
        results: dict[tuple[str, str], Sample] = {}
        for _ in range(args.rounds):  # interleaved: direct, gateway, router, direct, ...
            for case in cases:
                body: dict[str, object] = {"model": MODEL, "prompt": case.prompt,
                                           "max_tokens": case.chunks, "stream": case.stream}
                paths = {"direct": (fake, None)} | proxies
                for path, (url, pid) in paths.items():
                    sample = asyncio.run(measure(f"{url}/v1/completions", body, headers, case,
                                                 pid))
                    results.setdefault((label(case), path), Sample()).add(sample)
        print_table(cases, list(paths), results)
        if args.worker:
            worker_rows(args, proxies["gateway"][0], headers)
    finally:
        for process in processes:
            process.terminate()
            process.wait()


def label(case: Case) -> str:
    return f"{case.name} c={case.concurrency}"


def print_table(cases: list[Case], paths: list[str],
                results: dict[tuple[str, str], Sample]) -> None:
    header = (f"{'case':<19} {'path':<8} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} "
              f"{'+p50 ms':>7} {'+p99 ms':>7} {'cpu ms/req':>10} {'cpu us/chunk':>12} "
              f"{'cpu vs router':>13}")
    print(header)
    print("-" * len(header))
    for case in cases:
        direct = results[(label(case), "direct")]
        router = results.get((label(case), "router"))
        for path in paths:
            r = results[(label(case), path)]
            line = (f"{label(case):<19} {path:<8} {r.requests / r.seconds:>8.1f} "
                    f"{r.p(0.5):>7.2f} {r.p(0.99):>7.2f}")
            if path == "direct":
                print(line)
                continue
            cpu = r.cpu / r.requests * 1e3
            per_chunk = f"{cpu * 1e3 / case.chunks:>12.1f}" if case.stream else f"{'':>12}"
            ratio = (f"{r.cpu / router.cpu:>12.2f}x" if router is not None and router.cpu
                     else f"{'':>13}")
            print(f"{line} {r.p(0.5) - direct.p(0.5):>7.2f} {r.p(0.99) - direct.p(0.99):>7.2f} "
                  f"{cpu:>10.3f} {per_chunk} {ratio}")


def worker_rows(args: argparse.Namespace, gateway: str, headers: dict[str, str]) -> None:
    """Throughput over a real vLLM worker, direct and through the gateway, interleaved."""
    body: dict[str, object] = {"prompt": "Hello there", "max_tokens": args.worker_tokens,
                               "temperature": 0, "ignore_eos": True, "stream": True}
    case = Case("worker stream", True, 8, args.worker_requests)
    served = httpx.get(f"{args.worker.rstrip('/')}/v1/models", timeout=10).json()
    worker_model = served["data"][0]["id"]
    direct, through = Sample(), Sample()
    for _ in range(args.rounds):
        direct.add(asyncio.run(measure(f"{args.worker.rstrip('/')}/v1/completions",
                                       body | {"model": worker_model}, {}, case, None)))
        through.add(asyncio.run(measure(f"{gateway}/v1/completions",
                                        body | {"model": "accounts/fireworks/models/worker"},
                                        headers, case, None)))
    ratio = (through.requests / through.seconds) / (direct.requests / direct.seconds)
    print(f"\nreal worker, {args.worker_tokens}-token streams at concurrency 8: "
          f"direct {direct.requests / direct.seconds:.2f}/s, gateway "
          f"{through.requests / through.seconds:.2f}/s, ratio {ratio:.3f}")


if __name__ == "__main__":
    main()
