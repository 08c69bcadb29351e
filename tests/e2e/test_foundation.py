"""Through the gateway to a real vLLM worker serving SmolLM2: chat and text completions,
streaming and not, with both SDKs."""

from __future__ import annotations

import httpx
import orjson
import pytest
from fireworks import Fireworks
from openai import OpenAI

from tests.e2e.conftest import OTHER_KEY, Stack

pytestmark = pytest.mark.e2e
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def sse_payloads(text: str) -> list[str]:
    return [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]


def test_openai_sdk_chat_answers_paris(stack: Stack) -> None:
    client = OpenAI(base_url=f"{stack.base_url}/inference/v1", api_key=stack.api_key)
    response = client.chat.completions.create(model=stack.model, messages=QUESTION,  # type: ignore[arg-type]
                                              temperature=0)
    assert "Paris" in (response.choices[0].message.content or "")
    assert response.model == stack.model
    assert response.usage is not None and response.usage.prompt_tokens > 0


def test_fireworks_sdk_chat_answers_paris(stack: Stack) -> None:
    client = Fireworks(base_url=stack.base_url, api_key=stack.api_key)
    response = client.chat.completions.create(model=stack.model, messages=QUESTION,  # type: ignore[arg-type]
                                              temperature=0)
    assert "Paris" in (response.choices[0].message.content or "")


def test_fireworks_sdk_streaming_chat_has_usage_on_finish_chunk(stack: Stack) -> None:
    client = Fireworks(base_url=stack.base_url, api_key=stack.api_key)
    chunks = list(client.chat.completions.create(model=stack.model, messages=QUESTION,  # type: ignore[arg-type]
                                                 temperature=0, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishing) == 1 and finishing[0] is chunks[-1]
    assert finishing[0].usage is not None
    usage = finishing[0].usage
    # Every content chunk is one token; the EOS that ended the answer counts too.
    assert usage.completion_tokens == len([c for c in chunks if c.choices[0].delta.content]) + 1
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_text_completion_non_streaming(stack: Stack) -> None:
    response = httpx.post(f"{stack.base_url}/v1/completions", headers=stack.headers, json={
        "model": stack.model, "prompt": "The capital of France is", "temperature": 0,
        "max_tokens": 5,
    }, timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "text_completion"
    assert body["model"] == stack.model
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 5
    assert int(response.headers["fireworks-prompt-tokens"]) == body["usage"]["prompt_tokens"]
    assert float(response.headers["fireworks-server-processing-time"]) > 0
    assert response.headers["x-request-id"]


def test_text_completion_streaming_ends_with_done(stack: Stack) -> None:
    with httpx.stream("POST", f"{stack.base_url}/inference/v1/completions",
                      headers=stack.headers, json={
                          "model": stack.model, "prompt": "Once upon a time",
                          "temperature": 0, "max_tokens": 8, "stream": True}, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert "fireworks-server-time-to-first-token" in r.headers
        payloads = sse_payloads(r.read().decode())
    assert payloads[-1] == "[DONE]"
    chunks = [orjson.loads(p) for p in payloads[:-1]]
    assert len("".join(c["choices"][0]["text"] for c in chunks)) > 0
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 8
    assert all(c["usage"] is None for c in chunks[:-1])


def test_unknown_model_is_404_with_envelope(stack: Stack) -> None:
    response = httpx.post(f"{stack.base_url}/v1/chat/completions", headers=stack.headers,
                          json={"model": "accounts/fireworks/models/nope",
                                "messages": QUESTION})
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["code"] == "NOT_FOUND" and error["param"] == "model"


def test_other_accounts_deployment_looks_like_it_does_not_exist(stack: Stack) -> None:
    missing = httpx.post(f"{stack.base_url}/v1/chat/completions", headers=stack.headers,
                         json={"model": "accounts/other/deployments/nope",
                               "messages": QUESTION})
    private = httpx.post(f"{stack.base_url}/v1/chat/completions", headers=stack.headers,
                         json={"model": "accounts/other/deployments/private-smollm2",
                               "messages": QUESTION})
    assert missing.status_code == private.status_code == 404
    owner = httpx.post(f"{stack.base_url}/v1/chat/completions",
                       headers={"Authorization": f"Bearer {OTHER_KEY}"},
                       json={"model": "accounts/other/deployments/private-smollm2",
                             "messages": QUESTION, "max_tokens": 2}, timeout=60)
    assert owner.status_code == 200, owner.text


def test_bad_key_is_401_and_unknown_field_is_400(stack: Stack) -> None:
    unauthorized = httpx.post(f"{stack.base_url}/v1/chat/completions",
                              headers={"Authorization": "Bearer wrong"},
                              json={"model": stack.model, "messages": QUESTION})
    assert unauthorized.status_code == 401
    assert unauthorized.json()["error"]["code"] == "UNAUTHORIZED"
    extra = httpx.post(f"{stack.base_url}/v1/chat/completions", headers=stack.headers,
                       json={"model": stack.model, "messages": QUESTION, "bogus": 1})
    assert extra.status_code == 400
    assert extra.json()["error"]["message"] == "Extra inputs are not permitted, field: 'bogus'"


def test_engine_plugins_are_loaded_in_the_worker(stack: Stack) -> None:
    """A malformed Mirostat argument is rejected by the processor's validation in the
    worker, and comes back through the gateway as a 400 naming the parameter."""
    response = httpx.post(f"{stack.worker_url}/v1/completions", json={
        "prompt": "Hi", "max_tokens": 2, "vllm_xargs": {"mirostat_target": "abc"}})
    assert response.status_code == 400
    assert "mirostat_target" in response.json()["error"]["message"]
