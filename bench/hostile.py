"""What one account can do to another, measured through the gateway (issue 34's scenes),
over a scripted worker that runs 4 requests at once and queues the rest as vLLM does
(bench/tenancy.py), the gateway's queue at 2 + 2 reserved as docs/operations.md advises:

- unread: account B opens 12 streams of ~30 MB each and never reads them; then account A
  sends 6 streamed requests. How many of A's are served, and how long they take.
- priority flood: A keeps 4 streams going while B floods at 10x the worker's capacity, at
  the standard tier and then marked `service_tier: "priority"` (B is not entitled to it);
  the queue at 4 + 0, so that every request waits its turn.
  A's requests served and their time to first token; B's sent and shed.
- template: one 130 KB embeddings body (ten 10 KB texts, a template of 2,000 `{text}`):
  the answer, and how much the gateway process's peak memory grew.

    python -m bench.hostile                  # this tree
    python -m bench.hostile --src ../before  # the gateway from another checkout
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import orjson
import yaml

from bench.gateway import start, wait
from bench.tenancy import FLOOD_KEY, LIGHT_KEY, MODEL, percentile
from gateway.controlplane.registry import hash_key
from tests.conftest import free_port

EMBEDDER = "accounts/tenancy/models/embed"
SLOTS, RESERVE = 4, 2


def gateway(worker: str, src: str | None, reserve: int = RESERVE
            ) -> tuple[str, int, object]:
    registry = Path(tempfile.mkdtemp(prefix="bench-hostile-")) / "registry.yaml"
    registry.write_text(yaml.safe_dump({
        "accounts": [{"id": "tenancy", "api_keys": []},
                     {"id": "flood", "api_keys": [hash_key(FLOOD_KEY)]},
                     {"id": "light", "api_keys": [hash_key(LIGHT_KEY)]}],
        "deployments": [{"id": "shared", "account": "tenancy", "model": MODEL,
                         "default": True, "replicas": [{"url": worker}]},
                        {"id": "embed", "account": "tenancy", "model": EMBEDDER,
                         "default": True, "task": "embed", "replicas": [{"url": worker}]}]}))
    port = free_port()
    env = dict(os.environ, GATEWAY_REGISTRY_PATH=str(registry), GATEWAY_PORT=str(port),
               GATEWAY_PUBLIC_ACCOUNTS='["tenancy"]', GATEWAY_HEALTH_CHECK_INTERVAL="0.2",
               GATEWAY_QUEUE_REPLICA_LOAD=str(SLOTS - reserve),
               GATEWAY_QUEUE_RESERVE=str(reserve), GATEWAY_LOG_LEVEL="error")
    # `python -m` puts the working directory first on the path: the tree it runs is `src`.
    process = subprocess.Popen([sys.executable, "-m", "gateway", "serve"], env=env,
                               cwd=src or None, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait(url + "/health")
    return url, port, process


def stop(process: object) -> None:
    process.terminate()  # type: ignore[attr-defined]
    process.wait()  # type: ignore[attr-defined]


def body(**extra: object) -> bytes:
    return orjson.dumps({"model": MODEL, "prompt": "hello", "max_tokens": 64,
                         "stream": True} | extra)


async def streamed(session: aiohttp.ClientSession, url: str, key: str,
                   **extra: object) -> tuple[int, float | None, float]:
    """One streamed request read to its end: (status, time to first token, total time)."""
    started = time.perf_counter()
    first = None
    async with session.post(f"{url}/inference/v1/completions", data=body(**extra),
                            headers={"Authorization": f"Bearer {key}",
                                     "content-type": "application/json"}) as response:
        async for part in response.content.iter_any():
            if first is None and b"data: {" in part:
                first = time.perf_counter() - started
        return response.status, first, time.perf_counter() - started


def unread(port: int, url: str) -> str:
    socks = []
    payload = body()
    for _ in range(12):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", port))
        sock.sendall(b"POST /inference/v1/completions HTTP/1.1\r\nhost: gw\r\n"
                     b"authorization: Bearer " + FLOOD_KEY.encode() + b"\r\n"
                     b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                     % (len(payload), payload))
        socks.append(sock)
    time.sleep(1)

    async def light() -> list[tuple[int, float | None, float]]:
        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            return await asyncio.gather(*(streamed(session, url, LIGHT_KEY)
                                          for _ in range(6)))

    results = asyncio.run(light())
    for sock in socks:
        sock.close()
    served = [r for r in results if r[0] == 200]
    codes = sorted(r[0] for r in results)
    return (f"A served {len(served)} of 6 (statuses {codes}), "
            f"slowest {max(r[2] for r in results):.1f} s")


def flood_process(url: str, per_second: float, seconds: float, tier: str,
                  results: multiprocessing.Queue[tuple[int, dict[int, int]]]) -> None:
    async def run() -> tuple[int, dict[int, int]]:
        sent = 0
        statuses: dict[int, int] = {}
        extra = {"service_tier": tier} if tier else {}

        async def one(session: aiohttp.ClientSession) -> None:
            try:
                status, _, _ = await streamed(session, url, FLOOD_KEY, **extra)
            except aiohttp.ClientError:
                status = 0
            statuses[status] = statuses.get(status, 0) + 1

        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            tasks = []
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                sent += 1
                tasks.append(asyncio.create_task(one(session)))
                await asyncio.sleep(random.expovariate(per_second))
            await asyncio.wait(tasks, timeout=35)
        return sent, statuses

    results.put(asyncio.run(run()))


def flood(url: str, tier: str, seconds: float = 20.0) -> str:
    capacity = SLOTS / (0.2 + 9 / 5)  # the scripted worker: 2 s per request, 4 at once
    context = multiprocessing.get_context("spawn")
    results: multiprocessing.Queue[tuple[int, dict[int, int]]] = context.Queue()
    process = context.Process(target=flood_process,
                              args=(url, capacity * 10, seconds, tier, results))
    process.start()
    time.sleep(3)

    async def light() -> list[tuple[int, float | None, float]]:
        out: list[tuple[int, float | None, float]] = []
        end = time.perf_counter() + seconds - 3

        async def client(session: aiohttp.ClientSession) -> None:
            while time.perf_counter() < end:
                out.append(await streamed(session, url, LIGHT_KEY))

        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            await asyncio.gather(*(client(session) for _ in range(4)))
        return out

    results_light = asyncio.run(light())
    sent, statuses = results.get()
    process.join()
    ok = [r[1] for r in results_light if r[0] == 200 and r[1] is not None]
    return (f"A served {len(ok)} of {len(results_light)}, TTFT p50 "
            f"{percentile(ok, 0.5) * 1000:.0f} ms p99 {percentile(ok, 0.99) * 1000:.0f} ms; "
            f"B sent {sent}, statuses {dict(sorted(statuses.items()))}")


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def template(url: str, pid: int) -> str:
    import httpx

    before = peak_rss(pid)
    response = httpx.post(f"{url}/inference/v1/embeddings", timeout=120,
                          headers={"Authorization": f"Bearer {LIGHT_KEY}"},
                          json={"model": EMBEDDER, "input": ["x" * 10_000] * 10,
                                "prompt_template": "{text}" * 2000})
    grown = (peak_rss(pid) - before) / (1 << 20)
    return f"{response.status_code} in {response.elapsed.total_seconds():.2f} s, " \
           f"peak memory +{grown:.0f} MB ({response.json()['error']['message'][:70]})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--src", help="the gateway's source tree (its process runs there)")
    parser.add_argument("--scenes", default="template,unread,flood")
    args = parser.parse_args()
    scenes = args.scenes.split(",")
    print(f"gateway from {args.src or 'this tree'}")
    port = free_port()
    worker = start([sys.executable, "-m", "bench.tenancy", "worker", str(port), "--slots",
                    str(SLOTS), "--tokens", "50", "--rate", "50", "--pad", "600000"])
    worker_url = f"http://127.0.0.1:{port}"
    wait(worker_url + "/health")
    try:
        url, gw_port, process = gateway(worker_url, args.src)
        try:
            if "template" in scenes:
                print(f"{'template':<22}{template(url, process.pid)}")  # type: ignore[attr-defined]
            if "unread" in scenes:
                print(f"{'unread':<22}{unread(gw_port, url)}")
        finally:
            stop(process)
    finally:
        stop(worker)
    if "flood" not in scenes:
        return
    worker = start([sys.executable, "-m", "bench.tenancy", "worker", str(port), "--slots",
                    str(SLOTS), "--tokens", "10", "--rate", "5"])
    wait(worker_url + "/health")
    try:
        for tier in ("", "priority"):
            url, _, process = gateway(worker_url, args.src, reserve=0)
            try:
                label = f"flood {tier or 'standard'}"
                print(f"{label:<22}{flood(url, tier)}")
            finally:
                stop(process)
            time.sleep(3)
    finally:
        stop(worker)


if __name__ == "__main__":
    main()
