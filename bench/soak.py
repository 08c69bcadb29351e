"""The gateway's memory over many requests (not a test): `make bench-soak`.

One gateway process over the fast fake worker (bench/fake_upstream.py), without Redis, with
a real redis-server, and with Redis configured but down (usage records wait in the gateway,
up to its bound, past which requests are refused with 503): `--requests` requests from
`--concurrency` closed-loop clients (bench/raw_client.py), the first half plain, the second
half streamed, half of the clients on an account with limits (so that the limiter and the
usage records run). The gateway's resident memory (RSS) is sampled every tenth of the run:
it must level off, not grow with the number of requests.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from bench.gateway import wait
from bench.raw_client import Connection, completion
from gateway.controlplane.registry import hash_key
from tests.conftest import free_port
from tests.redis_server import RedisServer

MODEL = "accounts/fireworks/models/fake"
KEYS = {"alpha": "fw_soak_alpha", "limited": "fw_soak_limited"}


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def start_gateway(fake: int, redis_url: str | None) -> tuple[int, subprocess.Popen[bytes]]:
    registry = Path(tempfile.mkdtemp()) / "registry.yaml"
    registry.write_text(yaml.safe_dump({
        "accounts": [
            {"id": "fireworks"},
            {"id": "alpha", "api_keys": [hash_key(KEYS["alpha"])]},
            {"id": "limited", "api_keys": [hash_key(KEYS["limited"])],
             "limits": {"concurrent_requests": 1000, "requests_per_minute": 10_000_000}}],
        "deployments": [{"id": "fake", "account": "fireworks", "model": MODEL,
                         "default": True, "replicas": [{"url": f"http://127.0.0.1:{fake}"}]}]}))
    port = free_port()
    env = dict(os.environ, GATEWAY_REGISTRY_PATH=str(registry), GATEWAY_PORT=str(port),
               GATEWAY_LOG_LEVEL="warning")
    if redis_url:
        env["GATEWAY_REDIS_URL"] = redis_url
    process = subprocess.Popen([sys.executable, "-m", "gateway", "serve"], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait(f"http://127.0.0.1:{port}/health")
    return port, process


async def soak(port: int, pid: int, requests: int, concurrency: int
               ) -> tuple[list[tuple[int, float]], collections.Counter[int]]:
    """(requests answered, RSS MB) at every tenth of the run, and the answers' statuses."""
    done = 0
    statuses: collections.Counter[int] = collections.Counter()
    samples = [(0, rss_mb(pid))]
    step = requests // 10

    async def client(number: int) -> None:
        nonlocal done
        connection = Connection(port)
        key = KEYS["alpha" if number % 2 == 0 else "limited"]
        while done < requests:
            status = await connection.send(completion(key, MODEL, done >= requests // 2))
            done += 1
            statuses[status] += 1
            if done % step == 0:
                samples.append((done, rss_mb(pid)))
        connection.close()

    await asyncio.gather(*(client(n) for n in range(concurrency)))
    return samples, statuses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--concurrency", type=int, default=50)
    args = parser.parse_args()
    fake = free_port()
    upstream = subprocess.Popen([sys.executable, "-m", "bench.fake_upstream", str(fake)])
    wait(f"http://127.0.0.1:{fake}/health")
    redis = RedisServer()
    try:
        print(f"{args.requests} requests ({args.concurrency} clients; plain, then streamed)\n")
        print(f"{'state':<14} " + " ".join(f"{n // 1000:>5}k" for n in
                                           range(0, args.requests + 1, args.requests // 10))
              + "   (gateway RSS, MB, after that many requests)")
        for label in ("without Redis", "with Redis", "Redis down"):
            redis_url = None
            if label == "with Redis":
                redis.start()
                redis_url = redis.url
            elif label == "Redis down":
                redis.stop()
                redis_url = redis.url
            port, gateway = start_gateway(fake, redis_url)
            try:
                started = time.monotonic()
                samples, statuses = asyncio.run(soak(port, gateway.pid, args.requests,
                                                     args.concurrency))
                seconds = time.monotonic() - started
            finally:
                gateway.terminate()
                gateway.wait()
            answers = ", ".join(f"{n} x {status}" for status, n in sorted(statuses.items()))
            print(f"{label:<14} " + " ".join(f"{mb:>6.0f}" for _, mb in samples)
                  + f"   ({args.requests / seconds:,.0f} requests/s; {answers})", flush=True)
    finally:
        redis.stop()
        upstream.terminate()


if __name__ == "__main__":
    main()
