"""Prefix-derived affinity on real workers: `WORKERS=http://a,http://b make bench-affinity`
(not a test).

A workload of shared-prefix conversations: each conversation has a long head of its own (a
document, about `--head-tokens` tokens) and asks `--turns` questions about it, one after the
other, several conversations at once. The same workload runs through a gateway in front of
the workers twice, with affinity keys derived from the prompt's head
(GATEWAY_PREFIX_AFFINITY_BYTES=4096) and without (0: least loaded), each time on a fresh head
(so that neither run finds the other's cache). The table gives the share of prompt tokens
served from vLLM's prefix cache, and the time to the first token, per turn and overall.
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
import uuid
from pathlib import Path

import httpx
import yaml

from gateway.controlplane.registry import hash_key
from tests.conftest import free_port

KEY = "fw_bench_key"
MODEL = "accounts/fireworks/models/pair"
WORDS = ["river", "stone", "lantern", "orchard", "violet", "harbor", "meadow", "copper",
         "thunder", "willow", "candle", "glacier", "ember", "prairie", "falcon", "quartz"]


def registry_file(workers: list[str]) -> Path:
    registry = Path(tempfile.mkdtemp()) / "registry.yaml"
    registry.write_text(yaml.safe_dump({
        "accounts": [{"id": "fireworks", "api_keys": [hash_key(KEY)]}],
        "deployments": [{"id": "pair", "account": "fireworks", "model": MODEL,
                         "default": True, "replicas": [{"url": u} for u in workers]}]}))
    return registry


def head(conversation: int, tokens: int, salt: str) -> str:
    words = [WORDS[(conversation * 7 + i * 3) % len(WORDS)] for i in range(tokens)]
    return f"Document {salt}-{conversation}: " + " ".join(words)


async def conversation(client: httpx.AsyncClient, number: int, args: argparse.Namespace,
                       salt: str) -> list[tuple[int, float, int, int]]:
    """(turn, ttft seconds, prompt tokens, cached tokens) of each turn."""
    messages = [{"role": "system", "content": "Answer in one word."},
                {"role": "user", "content": head(number, args.head_tokens, salt)}]
    out = []
    for turn in range(args.turns):
        messages.append({"role": "user", "content": f"Question {turn}: one word?"})
        start = time.perf_counter()
        ttft, usage = 0.0, {}
        async with client.stream("POST", "/inference/v1/chat/completions", json={
                "model": MODEL, "messages": messages, "max_tokens": 2, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}}) as response:
            assert response.status_code == 200, await response.aread()
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                if not ttft:
                    ttft = time.perf_counter() - start
                chunk = httpx.Response(200, content=line[6:]).json()
                usage = chunk.get("usage") or usage
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        out.append((turn, ttft, usage.get("prompt_tokens", 0), cached))
        messages.append({"role": "assistant", "content": "ok"})
    return out


async def workload(url: str, args: argparse.Namespace,
                   salt: str) -> list[tuple[int, float, int, int]]:
    async with httpx.AsyncClient(base_url=url, timeout=600,
                                 headers={"Authorization": f"Bearer {KEY}"}) as client:
        results = await asyncio.gather(*(conversation(client, n, args, salt)
                                         for n in range(args.conversations)))
    return [row for rows in results for row in rows]


def run(workers: list[str], prefix_bytes: int,
        args: argparse.Namespace) -> list[tuple[int, float, int, int]]:
    port = free_port()
    env = dict(os.environ, GATEWAY_REGISTRY_PATH=str(registry_file(workers)),
               GATEWAY_PORT=str(port), GATEWAY_LOG_LEVEL="warning",
               GATEWAY_PREFIX_AFFINITY_BYTES=str(prefix_bytes),
               GATEWAY_HEALTH_CHECK_INTERVAL="0.5")
    gateway = subprocess.Popen([sys.executable, "-m", "gateway", "serve"], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        return asyncio.run(workload(url, args, uuid.uuid4().hex[:8]))
    finally:
        gateway.terminate()
        gateway.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", default=os.environ.get("WORKERS", ""),
                        help="comma-separated vLLM worker URLs (two or more)")
    parser.add_argument("--conversations", type=int, default=6)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--head-tokens", type=int, default=600)
    args = parser.parse_args()
    workers = [w.strip().rstrip("/") for w in args.workers.split(",") if w.strip()]
    if len(workers) < 2:
        parser.error("give two or more workers: --workers http://a,http://b")
    print(f"{len(workers)} workers, {args.conversations} conversations x {args.turns} turns, "
          f"heads of ~{args.head_tokens} words\n")
    print(f"{'affinity':<22} {'turn':>4} {'cached %':>9} {'ttft p50 ms':>12} "
          f"{'ttft mean ms':>13}")
    for label, prefix_bytes in (("prefix-derived (4096)", 4096), ("none (least loaded)", 0)):
        rows = run(workers, prefix_bytes, args)
        for turn in [*range(args.turns), None]:
            picked = [r for r in rows if turn is None or r[0] == turn]
            prompt = sum(r[2] for r in picked)
            cached = sum(r[3] for r in picked)
            ttfts = [r[1] * 1000 for r in picked]
            print(f"{label:<22} {'all' if turn is None else turn:>4} "
                  f"{100 * cached / max(prompt, 1):>8.1f}% {statistics.median(ttfts):>12.0f} "
                  f"{statistics.mean(ttfts):>13.0f}")
        print()


if __name__ == "__main__":
    main()
