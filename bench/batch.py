"""Batch inference beside interactive traffic, on scripted workers with a fixed capacity:

1. interactive time to first token (p50/p99), alone and while a 1,000-line job runs on the
   same deployment (the target: p99 within 1.2x of alone);
2. the job's throughput, against the same 1,000 requests sent straight to the gateway as
   fast as the workers take them (as many at once as the workers have slots);
3. the share of prompt tokens the workers found cached, for the job with its lines grouped
   by prefix and without (GATEWAY_BATCH_PREFIX_CHARS 0).

    make bench-batch

The scripted workers (`python -m bench.batch worker PORT`) serve `--slots` requests at once and
queue the rest in arrival order, as vLLM does past --max-num-seqs. A request's prefill takes
`--prefill` seconds plus `--per-kchar` per thousand characters of its prompt that are not in
the worker's prefix cache (64-character blocks, cached once a prefill ends, as vLLM's); then
`--tokens` tokens at `--rate` per second. What the engine itself would lose to a fuller batch
(a GPU's step is longer with more sequences) is not modelled: this measures what the gateway
decides, which is where batch lines wait and which pod gets them.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml

from bench.gateway import start, wait
from bench.slots import Slots
from gateway.controlplane.registry import hash_key
from tests.conftest import free_port
from tests.redis_server import RedisServer

KEY, BATCH_KEY = "fw_interactive_key", "fw_nightly_key"
MODEL = "accounts/bench/models/shared"
BLOCK = 64  # characters per cached block
LINES = 1000
DOCUMENTS = 20


def worker_app(slots: int, prefill: float, per_kchar: float, tokens: int, rate: float
               ) -> object:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
    from starlette.routing import Route

    slot = Slots(slots)
    cached: set[bytes] = set()  # the prefix cache: hashes of block chains

    def blocks(prompt: str) -> list[bytes]:
        chain, found = hashlib.blake2b(digest_size=16), []
        for at in range(0, len(prompt) - BLOCK + 1, BLOCK):
            chain.update(prompt[at:at + BLOCK].encode())
            found.append(chain.copy().digest())
        return found

    async def generate(prompt: str) -> tuple[int, int]:
        """Prefill (what is not cached), then cache the prompt: (prompt, cached) tokens."""
        chain = blocks(prompt)
        hit = 0
        while hit < len(chain) and chain[hit] in cached:
            hit += 1
        await asyncio.sleep(prefill + per_kchar * (len(prompt) - hit * BLOCK) / 1000)
        cached.update(chain)
        return len(prompt) // 4, hit * BLOCK // 4

    async def chat(request: Request) -> Response:
        body = orjson.loads(await request.body())
        prompt = "".join(m["content"] for m in body["messages"])
        usage: dict[str, Any] = {}

        async def events() -> AsyncIterator[bytes]:
            await slot.take()
            try:
                prompt_tokens, hit = await generate(prompt)
                for index in range(tokens):
                    yield b"data: " + orjson.dumps({
                        "id": "c", "object": "chat.completion.chunk", "created": 1,
                        "model": "shared", "choices": [{"index": 0, "delta": {
                            "content": f" t{index}"}, "finish_reason": None}]}) + b"\n\n"
                    await asyncio.sleep(1 / rate)
                usage.update(prompt_tokens=prompt_tokens, completion_tokens=tokens,
                             total_tokens=prompt_tokens + tokens,
                             prompt_tokens_details={"cached_tokens": hit})
                yield b"data: " + orjson.dumps({
                    "id": "c", "object": "chat.completion.chunk", "created": 1,
                    "model": "shared", "choices": [], "usage": usage}) + b"\n\n"
                yield b"data: [DONE]\n\n"
            finally:
                slot.give()

        if body.get("stream"):
            return StreamingResponse(events(), media_type="text/event-stream")
        async for _ in events():
            pass
        return JSONResponse({"id": "c", "object": "chat.completion", "created": 1,
                             "model": "shared", "usage": usage, "choices": [{
                                 "index": 0, "finish_reason": "length", "message": {
                                     "role": "assistant", "content": "t" * tokens}}]})

    async def metrics(request: Request) -> Response:
        return PlainTextResponse(slot.metrics())

    async def health(request: Request) -> Response:
        return PlainTextResponse("")

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]),
                             Route("/metrics", metrics), Route("/health", health)])


def gateway(replicas: list[str], redis_url: str, slots: int, headroom: int,
            prefix_chars: int) -> tuple[str, subprocess.Popen[bytes]]:
    folder = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    registry = folder / "registry.yaml"
    registry.write_text(yaml.safe_dump({
        "accounts": [{"id": "bench", "api_keys": [hash_key(KEY)]},
                     {"id": "nightly", "api_keys": [hash_key(BATCH_KEY)]}],
        "deployments": [{"id": "shared", "account": "bench", "model": MODEL,
                         "default": True, "replicas": [{"url": url} for url in replicas]}]}))
    port = free_port()
    env = dict(os.environ, GATEWAY_REGISTRY_PATH=str(registry), GATEWAY_PORT=str(port),
               GATEWAY_PUBLIC_ACCOUNTS='["bench"]', GATEWAY_HEALTH_CHECK_INTERVAL="0.2",
               GATEWAY_QUEUE_REPLICA_LOAD=str(slots), GATEWAY_BATCH_HEADROOM=str(headroom),
               GATEWAY_BATCH_CONCURRENCY=str(2 * slots * len(replicas)),
               GATEWAY_BATCH_PREFIX_CHARS=str(prefix_chars), GATEWAY_REDIS_URL=redis_url,
               GATEWAY_REDIS_PREFIX=f"bench{random.getrandbits(32):x}:",
               GATEWAY_BATCH_DIR=str(folder / "volume"), GATEWAY_LOG_LEVEL="error")
    process = start([sys.executable, "-m", "gateway", "serve"], env)
    url = f"http://127.0.0.1:{port}"
    wait(url + "/health")
    return url, process


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def documents() -> list[str]:
    rng = random.Random(7)
    words = ["lighthouse", "harbour", "glacier", "orchard", "ledger", "compass", "meadow"]
    return [f"Document {d}: " + " ".join(rng.choice(words) for _ in range(400))
            for d in range(DOCUMENTS)]


def job_lines(by_document: bool) -> list[dict[str, Any]]:
    """1,000 questions on 20 documents: a document's questions one after the other, or the
    documents in turn."""
    docs = documents()
    pairs = [(d, i) for d in range(DOCUMENTS) for i in range(LINES // DOCUMENTS)]
    if not by_document:
        pairs.sort(key=lambda pair: (pair[1], pair[0]))
    return [{"custom_id": f"q{d}-{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": MODEL, "max_tokens": 16, "messages": [
                 {"role": "system", "content": docs[d]},
                 {"role": "user", "content": f"Question {i} on document {d}?"}]}}
            for d, i in pairs]


async def interactive(url: str, per_second: float, seconds: float) -> list[float]:
    """Poisson arrivals of short streamed chats; their times to first token."""
    ttft: list[float] = []
    rng = random.Random(3)

    async def one(session: aiohttp.ClientSession, n: int) -> None:
        started = time.perf_counter()
        body = {"model": MODEL, "stream": True, "max_tokens": 16, "messages": [
            {"role": "user", "content": f"Interactive question {n}: " + "w" * 200}]}
        async with session.post(url + "/inference/v1/chat/completions", json=body,
                                headers={"Authorization": f"Bearer {KEY}"}) as response:
            async for raw in response.content:
                if raw.startswith(b"data: {") and b'"content"' in raw:
                    ttft.append(time.perf_counter() - started)
                    break
            async for _ in response.content:
                pass

    async with aiohttp.ClientSession() as session:
        tasks, n, end = [], 0, time.perf_counter() + seconds
        while time.perf_counter() < end:
            tasks.append(asyncio.create_task(one(session, n)))
            n += 1
            await asyncio.sleep(rng.expovariate(per_second))
        await asyncio.gather(*tasks)
    return ttft


async def submit(url: str, lines: list[dict[str, Any]]) -> str:
    data = b"".join(orjson.dumps(line) + b"\n" for line in lines)
    headers = {"Authorization": f"Bearer {BATCH_KEY}"}
    async with aiohttp.ClientSession() as session:
        form = aiohttp.FormData()
        form.add_field("purpose", "batch")
        form.add_field("file", io.BytesIO(data), filename="lines.jsonl")
        async with session.post(url + "/v1/files", data=form, headers=headers) as response:
            file_id = (await response.json())["id"]
        async with session.post(url + "/v1/batches", headers=headers, json={
                "input_file_id": file_id, "endpoint": "/v1/chat/completions",
                "completion_window": "24h"}) as response:
            return str((await response.json())["id"])


async def finish(url: str, batch_id: str) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {BATCH_KEY}"}
    async with aiohttp.ClientSession() as session:
        while True:
            async with session.get(f"{url}/v1/batches/{batch_id}",
                                   headers=headers) as response:
                batch: dict[str, Any] = await response.json()
            if batch["status"] in ("completed", "failed", "cancelled", "expired"):
                return batch
            await asyncio.sleep(0.2)


async def direct(url: str, lines: list[dict[str, Any]], at_once: int) -> float:
    """The job's requests sent straight to the gateway, `at_once` in flight: seconds."""
    pending = deque(line["body"] for line in lines)
    started = time.perf_counter()
    async with aiohttp.ClientSession() as session:
        async def client() -> None:
            while pending:
                body = pending.popleft()
                async with session.post(url + "/inference/v1/chat/completions", json=body,
                                        headers={"Authorization": f"Bearer {BATCH_KEY}"}
                                        ) as response:
                    await response.read()
        await asyncio.gather(*(client() for _ in range(at_once)))
    return time.perf_counter() - started


async def one_job(url: str, by_document: bool) -> dict[str, Any]:
    return await finish(url, await submit(url, job_lines(by_document)))


def run(args: argparse.Namespace) -> None:
    redis = RedisServer(appendfsync="everysec")  # Redis' default, as in production
    redis.start()
    ports = [free_port(), free_port()]
    workers: list[subprocess.Popen[bytes]] = []
    try:
        def fresh_workers() -> list[str]:
            for worker in workers:
                worker.terminate()
                worker.wait()
            workers.clear()
            for port in ports:
                workers.append(start([
                    sys.executable, "-m", "bench.batch", "worker", str(port), "--slots",
                    str(args.slots), "--prefill", str(args.prefill), "--per-kchar",
                    str(args.per_kchar), "--tokens", str(args.tokens), "--rate",
                    str(args.rate)]))
            urls = [f"http://127.0.0.1:{port}" for port in ports]
            for url in urls:
                wait(url + "/health")
            return urls

        lines = job_lines(by_document=True)
        per_request = args.prefill + args.tokens / args.rate
        capacity = 2 * args.slots / per_request
        rate = capacity * args.load
        print(f"Scripted workers: 2 x {args.slots} slots, about {per_request:.2f} s per "
              f"request; interactive at {rate:.1f}/s ({args.load:.0%} of capacity) for "
              f"{args.seconds:g} s; a job of {LINES} lines on {DOCUMENTS} documents; "
              f"headroom {args.headroom} per replica")
        rows: list[tuple[str, str, str, str]] = []

        url, gw = gateway(fresh_workers(), redis.url, args.slots, args.headroom, 512)
        try:
            asyncio.run(interactive(url, rate, 3.0))  # a warm gateway, as in the other case
            alone = asyncio.run(interactive(url, rate, args.seconds))
            rows.append(("interactive alone", f"{percentile(alone, .5) * 1000:.0f}",
                         f"{percentile(alone, .99) * 1000:.0f}", f"{len(alone)}"))

            async def both() -> tuple[list[float], dict[str, Any], float]:
                batch_id = await submit(url, lines)
                started = time.perf_counter()
                await asyncio.sleep(1.0)  # the job holds its share of the replicas
                ttft = await interactive(url, rate, args.seconds)
                batch = await finish(url, batch_id)
                return ttft, batch, time.perf_counter() - started
            during, grouped, took = asyncio.run(both())
            rows.append(("interactive with the job", f"{percentile(during, .5) * 1000:.0f}",
                         f"{percentile(during, .99) * 1000:.0f}", f"{len(during)}"))
        finally:
            gw.terminate()
            gw.wait()
        print(f"\n{'case':<28}{'TTFT p50 ms':>12}{'TTFT p99 ms':>12}{'requests':>10}")
        for row in rows:
            print(f"{row[0]:<28}{row[1]:>12}{row[2]:>12}{row[3]:>10}")
        ratio = percentile(during, .99) / percentile(alone, .99)
        print(f"p99 with the job / alone: {ratio:.2f}x (target 1.2x)")

        url, gw = gateway(fresh_workers(), redis.url, args.slots, args.headroom, 512)
        try:
            async def job_alone() -> tuple[dict[str, Any], float]:
                started = time.perf_counter()
                batch = await finish(url, await submit(url, lines))
                return batch, time.perf_counter() - started
            grouped_alone, job_seconds = asyncio.run(job_alone())
        finally:
            gw.terminate()
            gw.wait()
        shares: dict[tuple[bool, int], dict[str, Any]] = {(True, 512): grouped_alone}
        for by_document, chars in ((True, 0), (False, 512), (False, 0)):
            url, gw = gateway(fresh_workers(), redis.url, args.slots, args.headroom, chars)
            try:
                shares[by_document, chars] = asyncio.run(one_job(url, by_document))
            finally:
                gw.terminate()
                gw.wait()
        url, gw = gateway(fresh_workers(), redis.url, args.slots, args.headroom, 512)
        try:
            direct_seconds = asyncio.run(direct(url, lines, 2 * args.slots))
        finally:
            gw.terminate()
            gw.wait()

        def share(batch: dict[str, Any]) -> str:
            usage = batch["usage"]
            return f"{usage['input_tokens_details']['cached_tokens'] / usage['input_tokens']:.0%}"
        print(f"\n{'the 1,000 lines':<40}{'seconds':>9}{'lines/s':>9}{'cached':>8}")
        print(f"{'as a job, alone (grouped)':<40}{job_seconds:>9.1f}"
              f"{LINES / job_seconds:>9.1f}{share(grouped_alone):>8}")
        print(f"{'as a job, beside interactive traffic':<40}{took:>9.1f}"
              f"{LINES / took:>9.1f}{share(grouped):>8}")
        print(f"{f'sent straight, {2 * args.slots} at once':<40}{direct_seconds:>9.1f}"
              f"{LINES / direct_seconds:>9.1f}{'':>8}")
        print(f"job alone / sent straight: {direct_seconds / job_seconds:.2f}x the throughput "
              f"(the job keeps {args.headroom} of {args.slots} slots per replica free)")
        print(f"\n{'cached share of the prompt tokens':<40}{'grouped':>9}{'not':>9}")
        for by_document, order in ((True, "a document's questions together"),
                                   (False, "the documents in turn")):
            print(f"{order:<40}{share(shares[by_document, 512]):>9}"
                  f"{share(shares[by_document, 0]):>9}")
    finally:
        for worker in workers:
            worker.terminate()
        redis.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("role", nargs="?", default="bench", choices=["bench", "worker"])
    parser.add_argument("port", nargs="?", type=int)
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--prefill", type=float, default=0.05)
    parser.add_argument("--per-kchar", type=float, default=0.05)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--rate", type=float, default=40.0)
    parser.add_argument("--headroom", type=int, default=4)
    parser.add_argument("--load", type=float, default=0.15,
                        help="interactive arrivals, as a share of the workers' capacity")
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    if args.role == "worker":
        import uvicorn

        uvicorn.run(worker_app(args.slots, args.prefill, args.per_kchar,  # type: ignore[arg-type]
                               args.tokens, args.rate),
                    host="127.0.0.1", port=args.port, log_level="error")
        return
    run(args)


if __name__ == "__main__":
    main()
