"""Two accounts on one deployment: one floods at 10x what the workers can serve, the other
sends at 10% of it. The light account's time to first token, alone, under the flood with
the gateway's queue off (vLLM-style workers queue in arrival order), and with it on.

    make bench-tenancy                       # scripted workers with a fixed capacity
    WORKER=http://127.0.0.1:8001 SLOTS=4 make bench-tenancy   # a real worker too (its
                                             # --max-num-seqs; its capacity is measured)

The scripted workers (`python -m bench.tenancy worker PORT ...`) serve at most `--slots`
requests at once and queue the rest in arrival order, as vLLM does past --max-num-seqs:
each request takes `--prefill` seconds to its first token, then 1 to 2 x `--tokens` - 1
tokens (`--tokens` on average) at `--rate` per second; their /metrics report running and
waiting as vLLM's do.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson
import yaml

from bench.gateway import start, wait
from bench.slots import Slots
from gateway.controlplane.registry import hash_key
from tests.conftest import free_port

FLOOD_KEY, LIGHT_KEY = "fw_flood_key", "fw_light_key"
MODEL = "accounts/tenancy/models/shared"
DRAIN = 30.0  # seconds a light request may still wait for its first token after the run
MAX_TOKENS = int(os.environ.get("BENCH_MAX_TOKENS", "64"))  # a real worker's answers


def worker_app(slots: int, prefill: float, tokens: int, rate: float, pad: int = 0) -> object:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse, Response, StreamingResponse
    from starlette.routing import Route

    slot = Slots(slots)

    async def completions(request: Request) -> Response:
        await request.body()

        async def events() -> AsyncIterator[bytes]:
            await slot.take()
            # Answers of different lengths (as real ones are), `tokens` on average: requests
            # that start together do not all end together.
            length = random.randint(1, 2 * tokens - 1)
            try:
                await asyncio.sleep(prefill)
                for index in range(length):
                    last = index == length - 1
                    usage = {"prompt_tokens": 8, "completion_tokens": length,
                             "total_tokens": 8 + length} if last else None
                    yield b"data: " + orjson.dumps({
                        "id": "cmpl", "object": "text_completion", "created": 1,
                        "model": "shared", "usage": usage,
                        "choices": [{"index": 0, "text": f" t{index}" + "x" * pad,
                                     "logprobs": None,
                                     "finish_reason": "length" if last else None}]}) + b"\n\n"
                    if not last:
                        await asyncio.sleep(1 / rate)
                yield b"data: [DONE]\n\n"
            finally:
                slot.give()

        return StreamingResponse(events(), media_type="text/event-stream")

    async def metrics(request: Request) -> Response:
        return PlainTextResponse(slot.metrics() + "vllm:kv_cache_usage_perc 0.0\n")

    async def health(request: Request) -> Response:
        return PlainTextResponse("")

    return Starlette(routes=[Route("/v1/completions", completions, methods=["POST"]),
                             Route("/metrics", metrics), Route("/health", health)])


@dataclass
class Account:
    ttft: list[float] = field(default_factory=list)
    # Requests without a first token when the run ended: how long they had waited (their
    # time to first token is at least that).
    unanswered: list[float] = field(default_factory=list)
    shed: int = 0
    failed: int = 0
    sent: int = 0


async def one(session: aiohttp.ClientSession, url: str, key: str, account: Account) -> None:
    account.sent += 1
    started = time.perf_counter()
    first: float | None = None
    body = {"model": MODEL, "prompt": "hello", "max_tokens": MAX_TOKENS, "stream": True,
            "ignore_eos": True}
    try:
        async with session.post(f"{url}/inference/v1/completions", json=body,
                                headers={"Authorization": f"Bearer {key}"}) as response:
            if response.status == 503:
                account.shed += 1
                return
            if response.status != 200:
                account.failed += 1
                return
            first = None
            async for line in response.content:  # read to the end, as a client does
                if first is None and line.startswith(b"data: {"):
                    first = time.perf_counter() - started
                    account.ttft.append(first)
    except asyncio.CancelledError:
        if first is None:  # still no first token when the run ended
            account.unanswered.append(time.perf_counter() - started)
        raise
    except (TimeoutError, aiohttp.ClientError):
        account.failed += 1


async def send(url: str, key: str, per_second: float, seconds: float,
               account: Account, drain: float) -> None:
    """An open loop: Poisson arrivals, whatever the answers take; after `seconds`, at most
    `drain` more seconds for the answers still coming."""
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        tasks = []
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            tasks.append(asyncio.create_task(one(session, url, key, account)))
            await asyncio.sleep(random.expovariate(per_second))
        _, pending = await asyncio.wait(tasks, timeout=drain)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def gateway(replicas: list[str], queue: bool, slots: int, reserve: int = 0
            ) -> tuple[str, subprocess.Popen[bytes]]:
    registry = Path(tempfile.mkdtemp(prefix="bench-tenancy-")) / "registry.yaml"
    registry.write_text(yaml.safe_dump({
        "accounts": [{"id": "tenancy", "api_keys": []},
                     {"id": "flood", "api_keys": [hash_key(FLOOD_KEY)]},
                     {"id": "light", "api_keys": [hash_key(LIGHT_KEY)]}],
        "deployments": [{"id": "shared", "account": "tenancy", "model": MODEL,
                         "default": True, "replicas": [{"url": url} for url in replicas]}]}))
    port = free_port()
    env = dict(os.environ, GATEWAY_REGISTRY_PATH=str(registry), GATEWAY_PORT=str(port),
               GATEWAY_PUBLIC_ACCOUNTS='["tenancy"]', GATEWAY_HEALTH_CHECK_INTERVAL="0.2",
               # Saturated `reserve` short of the workers' slots: those are for accounts
               # with nothing waiting.
               GATEWAY_QUEUE_REPLICA_LOAD=str(slots - reserve if queue else 0),
               GATEWAY_QUEUE_RESERVE=str(reserve),
               GATEWAY_LOG_LEVEL="error", GATEWAY_STRICT_VALIDATION="false")
    process = start([sys.executable, "-m", "gateway", "serve"], env)
    url = f"http://127.0.0.1:{port}"
    wait(url + "/health")
    return url, process


def flood_process(url: str, per_second: float, seconds: float,
                  results: multiprocessing.Queue[tuple[int, int, int]]) -> None:
    """The flood runs in its own process, so that the light account's timings are not
    the load generator's own delays."""
    flooding = Account()
    asyncio.run(send(url, FLOOD_KEY, per_second, seconds, flooding, drain=1.0))
    results.put((flooding.sent, flooding.shed, flooding.failed))


def scenario(url: str, capacity: float, seconds: float, flood: bool, warmup: float
             ) -> tuple[Account, Account]:
    light, flooding = Account(), Account()
    context = multiprocessing.get_context("spawn")
    results: multiprocessing.Queue[tuple[int, int, int]] = context.Queue()
    process = context.Process(target=flood_process,
                              args=(url, capacity * 10, seconds, results)) if flood else None
    if process is not None:
        process.start()
        time.sleep(warmup)  # the workers saturated, their requests at different stages
    asyncio.run(send(url, LIGHT_KEY, capacity * 0.1, seconds - warmup, light, DRAIN))
    if process is not None:
        flooding.sent, flooding.shed, flooding.failed = results.get()
        process.join()
    return light, flooding


def measure_capacity(replicas: list[str], slots: int, seconds: float = 15.0) -> float:
    """Requests per second the replicas serve with `slots` requests always in flight each."""
    url, process = gateway(replicas, False, slots)

    async def closed_loop() -> int:
        done = 0
        end = time.perf_counter() + seconds
        async with aiohttp.ClientSession() as session:
            async def client() -> None:
                nonlocal done
                while time.perf_counter() < end:
                    account = Account()
                    await one(session, url, LIGHT_KEY, account)
                    done += len(account.ttft)
            await asyncio.gather(*(client() for _ in range(slots * len(replicas))))
        return done

    try:
        return asyncio.run(closed_loop()) / seconds
    finally:
        process.terminate()
        process.wait()


def table(title: str, replicas: list[str], slots: int, capacity: float, seconds: float,
          warmup: float, reserve: int) -> None:
    print(f"\n{title}: capacity {capacity:.1f} requests/s; light at {capacity * 0.1:.2f}/s, "
          f"flood at {capacity * 10:.0f}/s, {seconds:g} s each (light from {warmup:g} s)")
    print(f"{'case':<28}{'light p50':>10}{'light p99':>10}{'light n':>8}{'no token':>9}"
          f"{'flood sent':>11}{'flood shed':>11}{'errors':>8}")
    for label, queue, flood in (("light alone", True, False),
                                ("flood, no gateway queue", False, True),
                                ("flood, gateway queue", True, True)):
        url, process = gateway(replicas, queue, slots, reserve)
        try:
            light, flooding = scenario(url, capacity, seconds, flood, warmup if flood else 0)
        finally:
            process.terminate()
            process.wait()
        errors = light.failed + flooding.failed + light.shed
        waits = light.ttft + light.unanswered  # unanswered: lower bounds
        late = ">" if light.unanswered else " "
        print(f"{label:<28}{percentile(waits, 0.5) * 1000:>8.0f}ms"
              f"{late}{percentile(waits, 0.99) * 1000:>7.0f}ms{len(waits):>8}"
              f"{len(light.unanswered):>9}{flooding.sent:>11}{flooding.shed:>11}{errors:>8}")
        time.sleep(2)  # the workers drop what the last case left (its clients are gone)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("role", nargs="?", default="bench", choices=["bench", "worker"])
    parser.add_argument("port", nargs="?", type=int)
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--prefill", type=float, default=0.2)
    parser.add_argument("--tokens", type=int, default=10)
    parser.add_argument("--rate", type=float, default=5.0)
    parser.add_argument("--pad", type=int, default=0, help="bytes added to each token's text")
    parser.add_argument("--seconds", type=float, default=25.0)
    parser.add_argument("--warmup", type=float, default=5.0,
                        help="seconds of flood before the light account starts (real worker)")
    parser.add_argument("--worker", help="a real worker's URL, for a second table")
    parser.add_argument("--scripted", action=argparse.BooleanOptionalAction, default=True,
                        help="the scripted workers' table")
    parser.add_argument("--capacity", type=float, default=0.0,
                        help="the real worker's requests/s at saturation (0: measured)")
    parser.add_argument("--worker-slots", type=int, default=4,
                        help="the real worker's --max-num-seqs")
    parser.add_argument("--reserve", type=int, default=3,
                        help="slots per scripted worker for accounts with nothing waiting")
    parser.add_argument("--worker-reserve", type=int, default=1,
                        help="the same for the real worker")
    args = parser.parse_args()
    if args.role == "worker":
        import uvicorn

        uvicorn.run(worker_app(args.slots, args.prefill, args.tokens, args.rate,  # type: ignore[arg-type]
                               args.pad),
                    host="127.0.0.1", port=args.port, log_level="error")
        return
    if args.scripted:
        scripted(args)
    if args.worker:
        capacity = args.capacity or measure_capacity([args.worker], args.worker_slots)
        table(f"Real worker {args.worker}, {MAX_TOKENS} tokens per answer, queue at "
              f"{args.worker_slots - args.worker_reserve} + {args.worker_reserve} reserved",
              [args.worker], args.worker_slots, capacity, args.seconds, args.warmup,
              args.worker_reserve)


def scripted(args: argparse.Namespace) -> None:
    ports = [free_port(), free_port()]
    workers = [start([sys.executable, "-m", "bench.tenancy", "worker", str(port),
                      "--slots", str(args.slots), "--prefill", str(args.prefill),
                      "--tokens", str(args.tokens), "--rate", str(args.rate)])
               for port in ports]
    try:
        replicas = [f"http://127.0.0.1:{port}" for port in ports]
        for url in replicas:
            wait(url + "/health")
        duration = args.prefill + (args.tokens - 1) / args.rate
        capacity = len(replicas) * args.slots / duration
        table(f"Scripted workers: 2 x {args.slots} slots, {duration:.1f} s per request, queue "
              f"at {args.slots - args.reserve} + {args.reserve} reserved", replicas,
              args.slots, capacity, args.seconds, 2 * duration, args.reserve)
    finally:
        for worker in workers:
            worker.terminate()


if __name__ == "__main__":
    main()
