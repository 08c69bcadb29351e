"""The same flows driven by the real clients: openai (sync, async, streaming, raw headers),
fireworks-ai 1.x and the legacy fireworks.client 0.x API; and client disconnects."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable

import httpx
import pytest
from fireworks import AsyncFireworks, Fireworks
from openai import AsyncOpenAI, OpenAI

from tests.conftest import ROOT
from tests.e2e.conftest import Stack

pytestmark = pytest.mark.e2e
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
LEGACY = ROOT / ".venv" / "legacy-fireworks"


def test_openai_sync_streaming_and_raw_headers(stack: Stack) -> None:
    client = OpenAI(base_url=f"{stack.base_url}/inference/v1", api_key=stack.api_key)
    raw = client.chat.completions.with_raw_response.create(
        model=stack.model, messages=QUESTION, temperature=0,  # type: ignore[arg-type]
        extra_body={"top_k": 1})
    options = json.loads(raw.headers["fireworks-sampling-options"])
    assert options["top_k"] == 1 and options["temperature"] == 0
    completion = raw.parse()
    assert "Paris" in (completion.choices[0].message.content or "")
    assert int(raw.headers["fireworks-prompt-tokens"]) == completion.usage.prompt_tokens  # type: ignore[union-attr]
    chunks = list(client.completions.create(model=stack.model, prompt="Once upon a time",
                                            max_tokens=5, stream=True, temperature=0))
    assert chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5


def test_openai_async(stack: Stack) -> None:
    async def run() -> list[str]:
        client = AsyncOpenAI(base_url=f"{stack.base_url}/v1", api_key=stack.api_key)
        replies = await asyncio.gather(*[
            client.chat.completions.create(model=stack.model, messages=QUESTION,  # type: ignore[arg-type]
                                           temperature=0, max_tokens=12)
            for _ in range(3)])
        return [r.choices[0].message.content or "" for r in replies]

    answers = asyncio.run(run())
    assert all("Paris" in a for a in answers) and len(set(answers)) == 1


def test_fireworks_sdk_async_and_doubled_base_url(stack: Stack) -> None:
    async def run() -> str:
        client = AsyncFireworks(base_url=stack.base_url, api_key=stack.api_key)
        reply = await client.chat.completions.create(model=stack.model, messages=QUESTION,  # type: ignore[arg-type]
                                                     temperature=0)
        return reply.choices[0].message.content or ""

    assert "Paris" in asyncio.run(run())
    # An OpenAI-style base URL makes the SDK post to /inference/v1/v1/...
    doubled = Fireworks(base_url=f"{stack.base_url}/inference/v1", api_key=stack.api_key)
    completion = doubled.completions.create(model=stack.model, prompt="Hello", max_tokens=2)
    assert completion.usage.completion_tokens == 2
    try:
        doubled.chat.completions.create(model="accounts/fireworks/models/nope",
                                        messages=QUESTION)  # type: ignore[arg-type]
    except Exception as error:  # the SDK's NotFoundError
        assert getattr(error, "status_code", None) == 404
    else:
        raise AssertionError("expected a 404")


LEGACY_SCRIPT = """
import json, sys
import fireworks.client as fc
fc.api_key = sys.argv[2]
fc.base_url = sys.argv[1] + "/inference/v1"
model = sys.argv[3]
out = {}
r = fc.ChatCompletion.create(model=model, messages=[{"role": "user",
    "content": "What is the capital of France?"}], temperature=0)
out["chat"] = r.choices[0].message.content
chunks = list(fc.Completion.create(model=model, prompt="Hello", max_tokens=4, stream=True,
                                   temperature=0))
out["stream_usage"] = chunks[-1].usage.completion_tokens
r = fc.Completion.create(model=model, prompt="Hello", max_tokens=3, logprobs=1, temperature=0)
out["logprob_ids"] = r.choices[0].logprobs.token_ids
out["models"] = [m.id for m in fc.Model.list().data]
print(json.dumps(out))
"""


def test_legacy_fireworks_client(stack: Stack) -> None:
    assert (LEGACY / "fireworks" / "client" / "__init__.py").exists(), \
        "legacy client missing: scripts/install.sh installs it"
    env = dict(os.environ, PYTHONPATH=str(LEGACY))
    result = subprocess.run([sys.executable, "-c", LEGACY_SCRIPT, stack.base_url,
                             stack.api_key, stack.model], capture_output=True, text=True,
                            env=env, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert "Paris" in out["chat"]
    assert out["stream_usage"] == 4
    assert len(out["logprob_ids"]) == 3
    assert stack.model in out["models"]


def running_requests(worker_url: str) -> float:
    metrics = httpx.get(f"{worker_url}/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith("vllm:num_requests_running"))


def wait_for(condition: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_client_disconnect_stops_generation(stack: Stack) -> None:
    with httpx.stream("POST", f"{stack.base_url}/v1/completions", headers=stack.headers,
                      json={"model": stack.model, "prompt": "Tell me a long story.",
                            "max_tokens": 1500, "ignore_eos": True, "stream": True},
                      timeout=60) as response:
        # Keep the line iterator alive: closing it would close the connection already.
        lines = response.iter_lines()
        received = [line for line in (next(lines) for _ in range(6)) if line]
        assert len(received) >= 3
        assert wait_for(lambda: running_requests(stack.worker_url) >= 1, 5.0)
        response.close()  # the client goes away mid-stream
        assert wait_for(lambda: running_requests(stack.worker_url) == 0, 1.0)


def _post_then_leave(stack: Stack, body: dict[str, object]) -> bytes:
    """Send a request on a raw socket, hang up once the worker is generating for it, and
    return what had arrived by then."""
    host, port = stack.base_url.removeprefix("http://").split(":")
    payload = json.dumps({"model": stack.model} | body).encode()
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: gw\r\n"
                     b"authorization: Bearer " + stack.api_key.encode() + b"\r\n"
                     b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                     % (len(payload), payload))
        # The worker counts a request as running after its first engine step, which for the
        # long prompt is its whole prefill: ~10 s on a 2-core machine.
        assert wait_for(lambda: running_requests(stack.worker_url) >= 1, 30.0)
        sock.setblocking(False)
        try:
            received = sock.recv(65536)
        except BlockingIOError:
            received = b""
    return received


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "headers-held"])
def test_client_leaving_before_any_byte_stops_generation(stack: Stack, stream: bool) -> None:
    # A plain request sends nothing until the end; a stream holds its headers until the
    # first token, which a long prompt delays (prefill).
    prompt = "Tell me a long story. " * (300 if stream else 1)
    received = _post_then_leave(stack, {"prompt": prompt, "max_tokens": 1500,
                                        "ignore_eos": True, "stream": stream})
    if not stream:
        assert received == b""  # the answer was not complete: nothing was sent yet
    assert wait_for(lambda: running_requests(stack.worker_url) == 0, 1.0)


def test_fireworks_sdk_lists_the_accounts_models(stack: Stack) -> None:
    client = Fireworks(base_url=stack.base_url, api_key=stack.api_key, max_retries=0)
    names = [model.name for model in client.models.list(account_id="fireworks")]
    assert stack.model in names
    model = client.models.get(stack.model.rsplit("/", 1)[1], account_id="fireworks")
    assert model.context_length == 2048 and model.state == "READY"
    deployments = [d.name for d in client.deployments.list(account_id="fireworks")]
    assert "accounts/fireworks/deployments/smollm2-135m-instruct" in deployments
