"""The seam of a continued stream (docs/fireworks-api.md, "Streams that survive a worker"):
how long the client waits between the last token before it and the first after, against the
stream's usual gap between tokens, with and without the prompt already cached on the pod
that continues.

Two real vLLM workers (SmolLM2, CPU): the stream starts on the first, reached through a proxy
that cuts the connection after CUT streamed events (a worker that dies); the gateway continues
it on the second, which prefills the prompt and the CUT tokens generated so far (all of it, or
only the tokens past its cached prefix when the prompt was sent to it before).

    python -m bench.seam [--runs 3] [--cut 40] [--tokens 120]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import yaml

from engine_plugins.models import prepare_smollm2
from gateway.controlplane.registry import hash_key
from gateway.dataplane.isolation import account_salt
from tests.conftest import DATA_DIR, free_port
from tests.e2e.processes import start_gateway, start_worker

KEY = "bench-seam-key"
MODEL = "accounts/fireworks/models/seam"
SALT = account_salt("fireworks", "")


class CuttingProxy:
    """HTTP to one worker, one request per connection; a streamed answer is cut (both sides
    closed) after `cut` events, as when the worker dies."""

    def __init__(self, upstream_port: int, cut: int) -> None:
        self.upstream_port, self.cut = upstream_port, cut
        self.port = free_port()
        self.cutting = False  # only the measured streams are cut
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        asyncio.run_coroutine_threadsafe(self._serve(), self.loop).result()

    async def _serve(self) -> None:
        await asyncio.start_server(self._connection, "127.0.0.1", self.port)

    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            length = next((int(line.split(b":", 1)[1]) for line in lines
                           if line.lower().startswith(b"content-length:")), 0)
            body = await reader.readexactly(length)
            kept = [line for line in lines[:-2] if not line.lower().startswith(b"connection:")]
            request = b"\r\n".join([*kept, b"connection: close", b"", b""]) + body
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1",
                                                                 self.upstream_port)
            up_writer.write(request)
            seen, tail = 0, b""
            while data := await up_reader.read(65536):
                writer.write(data)
                await writer.drain()
                if self.cutting and b'"stream":true' in body.replace(b" ", b""):
                    seen += (tail + data).count(b"data: {")
                    tail = data[-8:]
                    if seen >= self.cut:
                        break
            up_writer.close()
        except (OSError, asyncio.IncompleteReadError):
            pass
        writer.transport.abort()


def stream(gateway: str, prompt: str, tokens: int) -> tuple[list[float], dict[str, Any]]:
    """Arrival times of the stream's token chunks, and its final usage."""
    times: list[float] = []
    usage: dict[str, Any] = {}
    with httpx.stream("POST", f"{gateway}/inference/v1/completions", timeout=300,
                      headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": MODEL, "prompt": prompt, "stream": True,
                            "temperature": 0, "max_tokens": tokens,
                            "ignore_eos": True}) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                assert not line.startswith("event: error"), line
                continue
            chunk = orjson.loads(line[6:])
            usage = chunk.get("usage") or usage
            if chunk["choices"] and chunk["choices"][0]["text"]:
                times.append(time.monotonic())
    return times, usage


def routed_to_proxy(gateway: str, proxy: str, topic: str) -> str:
    """A prompt about `topic` that the gateway sends to the proxied pod first (its routing
    keys requests by their prompt's head)."""
    for n in range(50):
        prompt = f"Notes {n} on {topic}: " + " ".join(f"{topic}{j}" for j in range(200)) + \
            f". Now a long essay about {topic}:"
        answer = httpx.post(f"{gateway}/inference/v1/completions", timeout=120,
                            headers={"Authorization": f"Bearer {KEY}"},
                            json={"model": MODEL, "prompt": prompt[:40], "max_tokens": 1})
        if answer.headers.get("fireworks-backend-host") == proxy.removeprefix("http://"):
            return prompt
    raise RuntimeError("no prompt routed to the proxied pod")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cut", type=int, default=40)
    parser.add_argument("--tokens", type=int, default=120)
    args = parser.parse_args()
    model_dir = prepare_smollm2(DATA_DIR)
    first_port, second_port = free_port(), free_port()
    children = [start_worker(model_dir, port, "--max-model-len", "2048",
                             "--served-model-name", "smollm2")
                for port in (first_port, second_port)]
    proxy = CuttingProxy(first_port, args.cut)
    proxied, second = f"http://127.0.0.1:{proxy.port}", f"http://127.0.0.1:{second_port}"
    registry = Path(tempfile.mkdtemp(prefix="bench-seam-")) / "registry.yaml"
    registry.write_text(yaml.safe_dump({
        "accounts": [{"id": "fireworks", "api_keys": [hash_key(KEY)]}],
        "deployments": [{"id": "seam", "account": "fireworks", "model": MODEL,
                         "default": True, "context_length": 2048,
                         "replicas": [{"url": proxied}, {"url": second}]}]}))
    gateway_port = free_port()
    children.append(start_gateway(registry, gateway_port, health_check_interval="0",
                                  eject_after_failures="1000", prefix_affinity_bytes="40"))
    gateway = f"http://127.0.0.1:{gateway_port}"
    rows = []
    try:
        for cached in (False, True):
            gaps, usual, prompts = [], [], []
            for run in range(args.runs):
                prompt = routed_to_proxy(gateway, proxied, f"topic{int(cached)}x{run}")
                if cached:  # the pod that continues has the prompt already
                    httpx.post(f"{second}/v1/completions", timeout=120, json={
                        "model": "smollm2", "prompt": prompt, "max_tokens": 1,
                        "cache_salt": SALT}).raise_for_status()
                proxy.cutting = True
                times, usage = stream(gateway, prompt, args.tokens)
                proxy.cutting = False
                assert len(times) == args.tokens, (len(times), usage)
                assert usage["completion_tokens"] == args.tokens
                steps = [b - a for a, b in itertools.pairwise(times)]
                gaps.append(steps[args.cut - 1])  # between token cut and cut + 1
                usual.append(statistics.median(steps[:args.cut - 1] + steps[args.cut:]))
                prompts.append(usage["prompt_tokens"])
            rows.append((cached, statistics.median(prompts), statistics.median(gaps),
                         statistics.median(usual)))
    finally:
        for child in children:
            child.stop()
    print(f"\nThe seam: a stream cut after {args.cut} of {args.tokens} tokens, continued on "
          f"the other pod ({args.runs} runs each, medians; SmolLM2-135M on CPU, 2 cores)\n")
    print("| prompt on the new pod | prompt tokens | tokens prefilled at the seam | "
          "seam gap (ms) | usual gap (ms) | ratio |")
    print("|---|---|---|---|---|---|")
    for cached, prompt_tokens, gap, usual_gap in rows:
        prefilled = f"{args.cut} + the prompt past its cached blocks" if cached \
            else f"{int(prompt_tokens) + args.cut} (prompt + {args.cut})"
        print(f"| {'cached' if cached else 'not cached'} | {int(prompt_tokens)} | {prefilled} "
              f"| {gap * 1000:.0f} | {usual_gap * 1000:.0f} | {gap / usual_gap:.1f}x |")


if __name__ == "__main__":
    main()
