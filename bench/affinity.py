"""Cache-aware routing on real workers (not a test):

    WORKERS=http://a,http://b KV_EVENTS=tcp://a:5557,tcp://b:5557 make bench-affinity

Three policies, each through a fresh gateway in front of the same workers, each run on text
of its own (so that no run finds another's cache): routing on the workers' KV-cache events
(the workers started with the launcher's --kv-events-port; KV_EVENTS lists their endpoints
in WORKERS' order), the prefix hash (an affinity key from the prompt's first 4096 bytes),
and the least loaded replica. Three workloads:

- conversations: `--conversations` at once, each with a long head of its own (a document,
  ~`--head-tokens` words) and `--turns` questions about it, one turn after the other;
- documents: `--requests` requests, `--concurrency` at once, each asking about two of
  `--documents` shorter documents in a random order (shorter than the hash's 4096 bytes, so
  that requests that share their first document hash differently); with the workers of
  docs/benchmarks.md, more documents than one pod's cache holds beside the requests' tails,
  about as many as two pods hold between them;
- pod restart: the conversations again; after half the turns the first worker leaves the
  deployment (admin API) for one turn, whose requests the other workers take, and comes back
  with its prefix cache emptied (vLLM's /reset_prefix_cache: the workers need
  VLLM_SERVER_DEV_MODE=1), as a restarted pod would.

The table gives the share of prompt tokens served from vLLM's prefix cache, the time to the
first token (p50, p99) and the decode time per token; with `--rounds` N > 1, each round
(the documents' pairs and order drawn anew) and the mean of each policy over the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson
import yaml

from gateway.controlplane.registry import hash_key
from tests.conftest import free_port

KEY = "fw_bench_key"
ADMIN = "fw_bench_admin"
MODEL = "accounts/fireworks/models/pair"
WORDS = ["river", "stone", "lantern", "orchard", "violet", "harbor", "meadow", "copper",
         "thunder", "willow", "candle", "glacier", "ember", "prairie", "falcon", "quartz"]
TOKENS = 8  # generated per request (ignore_eos), for the decode time


@dataclass
class Row:
    ttft: float
    prompt: int
    cached: int
    decode: float | None  # seconds per token after the first


def registry_file(workers: list[str], events: list[str] | None) -> Path:
    registry = Path(tempfile.mkdtemp()) / "registry.yaml"
    replicas = [{"url": url} | ({"kv_events": events[i]} if events else {})
                for i, url in enumerate(workers)]
    registry.write_text(yaml.safe_dump({
        "accounts": [{"id": "fireworks", "api_keys": [hash_key(KEY)]}],
        "deployments": [{"id": "pair", "account": "fireworks", "model": MODEL,
                         "default": True, "replicas": replicas}]}))
    return registry


def text(seed: str, number: int, words: int) -> str:
    picked = [WORDS[(number * 7 + i * 3 + len(seed)) % len(WORDS)] for i in range(words)]
    return f"Document {seed}-{number}: " + " ".join(picked)


async def ask(client: httpx.AsyncClient, messages: list[dict[str, str]]) -> Row:
    start = time.perf_counter()
    first = last = 0.0
    chunks, usage = 0, {}
    async with client.stream("POST", "/inference/v1/chat/completions", json={
            "model": MODEL, "messages": messages, "max_tokens": TOKENS, "ignore_eos": True,
            "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = orjson.loads(line[6:])
            usage = chunk.get("usage") or usage
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                last = time.perf_counter()
                first = first or last
                chunks += 1
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    decode = (last - first) / (chunks - 1) if chunks > 1 else None
    return Row(first - start, usage.get("prompt_tokens", 0), cached, decode)


async def restart(client: httpx.AsyncClient, replica: dict[str, str], leave: bool) -> None:
    """The replica leaves the deployment, or comes back with an empty prefix cache."""
    path = "/admin/v1/accounts/fireworks/deployments/pair/replicas"
    admin = {"Authorization": f"Bearer {ADMIN}"}
    if leave:
        answer = await client.delete(path, params={"url": replica["url"]}, headers=admin)
    else:
        worker = replica["url"]
        httpx.post(f"{worker}/reset_prefix_cache", timeout=30).raise_for_status()
        # vLLM publishes the reset (AllBlocksCleared) at its next step; a restarted pod's new
        # process has no old events to replay at all. One step, so that the two look alike.
        model = httpx.get(f"{worker}/v1/models", timeout=30).json()["data"][0]["id"]
        httpx.post(f"{worker}/v1/completions", timeout=60, json={
            "model": model, "prompt": "x", "max_tokens": 1}).raise_for_status()
        answer = await client.post(path, json=replica, headers=admin)
    answer.raise_for_status()
    await asyncio.sleep(1.5)  # the gateway has its new replica set (and subscription)


async def conversations(client: httpx.AsyncClient, args: argparse.Namespace, seed: str,
                        restarted: dict[str, str] | None) -> list[Row]:
    """Each conversation's turns one after the other, all conversations at once; with
    `restarted`, that replica is away for the turn after half of them."""
    chats = [[{"role": "system", "content": "Answer in one word."},
              {"role": "user", "content": text(seed, n, args.head_tokens)}]
             for n in range(args.conversations)]
    rows: list[Row] = []
    for turn in range(args.turns):
        if restarted is not None and turn in (args.turns // 2, args.turns // 2 + 1):
            await restart(client, restarted, leave=turn == args.turns // 2)
        for chat in chats:
            chat.append({"role": "user", "content": f"Question {turn}: one word?"})
        rows += await asyncio.gather(*(ask(client, chat) for chat in chats))
        for chat in chats:
            chat.append({"role": "assistant", "content": "ok"})
    return rows


async def documents(client: httpx.AsyncClient, args: argparse.Namespace,
                    seed: str, draw: int) -> list[Row]:
    docs = [text(seed, n, args.document_tokens) for n in range(args.documents)]
    order = random.Random(draw)  # every policy gets the same requests in a round
    asks = [order.sample(range(args.documents), 2) for _ in range(args.requests)]
    limit = asyncio.Semaphore(args.concurrency)

    async def one(number: int, pair: list[int]) -> Row:
        async with limit:
            content = f"{docs[pair[0]]}\n\n{docs[pair[1]]}\n\nQuestion {number}: one word?"
            return await ask(client, [{"role": "user", "content": content}])
    return list(await asyncio.gather(*(one(n, p) for n, p in enumerate(asks))))


def gateway(workers: list[str], events: list[str] | None, prefix_bytes: int
            ) -> tuple[str, subprocess.Popen[bytes]]:
    port = free_port()
    env = dict(os.environ, GATEWAY_REGISTRY_PATH=str(registry_file(workers, events)),
               GATEWAY_PORT=str(port), GATEWAY_LOG_LEVEL="warning",
               GATEWAY_PREFIX_AFFINITY_BYTES=str(prefix_bytes), GATEWAY_ADMIN_KEY=ADMIN,
               GATEWAY_HEALTH_CHECK_INTERVAL="0.5", GATEWAY_DISCOVERY_INTERVAL="0.5")
    process = subprocess.Popen([sys.executable, "-m", "gateway", "serve"], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    time.sleep(1.5)  # subscribed to the workers' events
    return url, process


def run(workload: str, workers: list[str], events: list[str] | None, prefix_bytes: int,
        args: argparse.Namespace, draw: int = 7) -> list[Row]:
    url, process = gateway(workers, events, prefix_bytes)
    seed = uuid.uuid4().hex[:8]

    async def go() -> list[Row]:
        async with httpx.AsyncClient(base_url=url, timeout=600,
                                     headers={"Authorization": f"Bearer {KEY}"}) as client:
            if workload == "documents":
                return await documents(client, args, seed, draw)
            first = {"url": workers[0]} | ({"kv_events": events[0]} if events else {})
            return await conversations(client, args, seed,
                                       first if workload == "pod restart" else None)
    try:
        return asyncio.run(go())
    finally:
        process.terminate()
        process.wait()


def p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default=os.environ.get("WORKERS", ""),
                        help="comma-separated vLLM worker URLs (two or more)")
    parser.add_argument("--kv-events", default=os.environ.get("KV_EVENTS", ""),
                        help="their KV-event endpoints, in the same order")
    parser.add_argument("--workloads", default="conversations,documents,pod restart")
    parser.add_argument("--conversations", type=int, default=6)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--head-tokens", type=int, default=600)
    parser.add_argument("--documents", type=int, default=16)
    parser.add_argument("--document-tokens", type=int, default=300)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    workers = [w.strip().rstrip("/") for w in args.workers.split(",") if w.strip()]
    events = [e.strip() for e in args.kv_events.split(",") if e.strip()] or None
    if len(workers) < 2:
        parser.error("give two or more workers: --workers http://a,http://b")
    if events is not None and len(events) != len(workers):
        parser.error("give one KV-event endpoint per worker")
    policies = [("prefix hash (4096 B)", None, 4096), ("least loaded", None, 0)]
    if events is not None:
        policies.insert(0, ("kv events", events, 4096))
    print(f"{len(workers)} workers; conversations: {args.conversations} x {args.turns} turns, "
          f"heads of ~{args.head_tokens} words; documents: {args.requests} requests over "
          f"{args.documents} documents of ~{args.document_tokens} words\n")
    print(f"{'workload':<14} {'policy':<21} {'cached %':>9} {'ttft p50':>9} {'ttft p99':>9} "
          f"{'decode ms/tok':>14}")
    results: dict[tuple[str, str], list[tuple[float, float, float, float]]] = {}
    for round_number in range(args.rounds):
        for workload in [w.strip() for w in args.workloads.split(",")]:
            for label, endpoints, prefix_bytes in policies:
                rows = run(workload, workers, endpoints, prefix_bytes, args, 7 + round_number)
                figures = summary(rows)
                results.setdefault((workload, label), []).append(figures)
                print(line(workload, label, figures), flush=True)
            print()
    if args.rounds > 1:
        print("mean of the rounds")
        for (workload, label), rounds in results.items():
            means = tuple(statistics.mean(f) for f in zip(*rounds, strict=True))
            print(line(workload, label, means))


def summary(rows: list[Row]) -> tuple[float, float, float, float]:
    """Cached share of prompt tokens (%), TTFT p50 and p99 (ms), decode ms per token."""
    prompt, cached = sum(r.prompt for r in rows), sum(r.cached for r in rows)
    ttfts = [r.ttft * 1000 for r in rows]
    decodes = [r.decode * 1000 for r in rows if r.decode is not None]
    return (100 * cached / max(prompt, 1), p(ttfts, 0.5), p(ttfts, 0.99),
            statistics.mean(decodes) if decodes else 0.0)


def line(workload: str, label: str, figures: tuple[float, ...]) -> str:
    cached, p50, p99, decode = figures
    return (f"{workload:<14} {label:<21} {cached:>8.1f}% {p50:>7.0f}ms {p99:>7.0f}ms "
            f"{decode:>12.1f}ms")


if __name__ == "__main__":
    main()
