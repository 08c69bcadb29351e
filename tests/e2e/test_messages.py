"""The Anthropic-compatible Messages API through the gateway, with the official `anthropic`
SDK (sync, async, streaming) on the real SmolLM2 worker."""

from __future__ import annotations

import asyncio

import anthropic
import httpx
import pytest

from tests.e2e.conftest import OTHER_KEY, Stack

pytestmark = pytest.mark.e2e
ASK = [{"role": "user", "content": "What is the capital of France?"}]


def client(stack: Stack, key: str | None = None) -> anthropic.Anthropic:
    return anthropic.Anthropic(api_key=key or stack.api_key,
                               base_url=f"{stack.base_url}/inference", max_retries=0)


def test_a_message_with_the_sdk(stack: Stack) -> None:
    message = client(stack).messages.create(model=stack.model, max_tokens=12, messages=ASK,
                                            extra_body={"temperature": 0})
    assert message.type == "message" and message.role == "assistant"
    assert message.content[0].type == "text" and message.content[0].text
    assert message.model == stack.model
    assert message.usage.input_tokens > 0 and 0 < message.usage.output_tokens <= 12
    again = client(stack).messages.create(model=stack.model, max_tokens=12, messages=ASK,
                                          extra_body={"temperature": 0})
    assert again.content[0].text == message.content[0].text  # greedy: the same answer


def test_async_and_streaming(stack: Stack) -> None:
    async def run() -> str:
        async_client = anthropic.AsyncAnthropic(api_key=stack.api_key, max_retries=0,
                                                base_url=f"{stack.base_url}/inference")
        message = await async_client.messages.create(model=stack.model, max_tokens=8,
                                                     messages=ASK,
                                                     extra_body={"temperature": 0})
        return str(message.content[0].text)

    whole = asyncio.run(run())
    with client(stack).messages.stream(model=stack.model, max_tokens=8, messages=ASK,
                                       extra_body={"temperature": 0}) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(pieces) == whole == final.content[0].text
    assert final.usage.output_tokens > 0 and final.model == stack.model


def test_errors_are_anthropic_shaped(stack: Stack) -> None:
    with pytest.raises(anthropic.AuthenticationError):
        client(stack, "not-a-key").messages.create(model=stack.model, max_tokens=4,
                                                   messages=ASK)
    with pytest.raises(anthropic.NotFoundError) as missing:
        client(stack).messages.create(model="accounts/fireworks/models/nope", max_tokens=4,
                                      messages=ASK)
    assert missing.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    with pytest.raises(anthropic.NotFoundError):  # another account's model
        client(stack).messages.create(model="accounts/other/models/private", max_tokens=4,
                                      messages=ASK)
    private = client(stack, OTHER_KEY).messages.create(  # its own account's: served
        model="accounts/other/models/private", max_tokens=2, messages=ASK)
    assert private.content
    bad = httpx.post(f"{stack.base_url}/v1/messages", timeout=30,
                     headers={"x-api-key": stack.api_key},
                     json={"model": stack.model, "messages": ASK})  # no max_tokens
    assert bad.status_code == 400
    assert bad.json()["type"] == "error"
    assert bad.json()["error"]["type"] == "invalid_request_error"


def test_a_client_that_leaves_a_stream_stops_the_worker(stack: Stack) -> None:
    from tests.e2e.test_clients import running_requests, wait_for

    with httpx.stream("POST", f"{stack.base_url}/inference/v1/messages", timeout=60,
                      headers={"x-api-key": stack.api_key},
                      json={"model": stack.model, "max_tokens": 1500, "stream": True,
                            "messages": [{"role": "user", "content": "A long story."}]}
                      ) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        assert any(line.startswith("event: content_block_delta")
                   for line in (next(lines) for _ in range(12)))
        assert wait_for(lambda: running_requests(stack.worker_url) >= 1, 5.0)
        response.close()
        assert wait_for(lambda: running_requests(stack.worker_url) == 0, 1.0)


def test_count_tokens_with_the_sdk(stack: Stack) -> None:
    """`messages.count_tokens` is the worker's own count (its chat template included): the
    same number as the worker gives directly, and the count grows with the input."""
    system = "You answer in one word, and only about geography. " * 10
    counted = client(stack).messages.count_tokens(model=stack.model, messages=ASK,
                                                  system=system)
    direct = httpx.post(f"{stack.worker_url}/v1/messages/count_tokens", timeout=30,
                        json={"model": "smollm2", "messages": ASK, "system": system})
    assert direct.status_code == 200
    assert counted.input_tokens == direct.json()["input_tokens"] > 0
    plain = client(stack).messages.count_tokens(model=stack.model, messages=ASK)
    longer = client(stack).messages.count_tokens(
        model=stack.model, messages=[{"role": "user", "content": ASK[0]["content"] * 3}])
    # the system prompt counts (SmolLM2's template has a short default one without it)
    assert plain.input_tokens < counted.input_tokens
    assert longer.input_tokens > plain.input_tokens
    with pytest.raises(anthropic.NotFoundError):
        client(stack).messages.count_tokens(model="accounts/fireworks/models/none",
                                            messages=ASK)
