"""Errors the gateway produces on the real worker, as LiteLLM's `fireworks_ai/` provider and the
openai SDK raise them, and worker messages that name the model the client asked for."""

from __future__ import annotations

from typing import Any

import litellm
import openai
import pytest

from tests.e2e.conftest import Stack

pytestmark = pytest.mark.e2e
ASK = [{"role": "user", "content": "What is the capital of France?"}]
LONG = "one two three four five six seven eight nine ten " * 185  # ~1850 tokens


def litellm_error(stack: Stack, key: str | None = None, **fields: Any) -> Exception:
    model = fields.pop("model", stack.model)
    try:
        litellm.completion(model=f"fireworks_ai/{model}", messages=fields.pop("messages", ASK),
                           api_base=f"{stack.base_url}/inference/v1",
                           api_key=key or stack.api_key, num_retries=0, max_retries=0,
                           max_tokens=fields.pop("max_tokens", 4), **fields)
    except Exception as exc:
        return exc
    raise AssertionError("no error")


def test_litellm_raises_what_fireworks_would_cause(stack: Stack) -> None:
    unknown = litellm_error(stack, model="accounts/fireworks/models/nothing-here")
    assert isinstance(unknown, litellm.NotFoundError), unknown
    assert isinstance(litellm_error(stack, key="fw-wrong"), litellm.AuthenticationError)
    assert isinstance(litellm_error(stack, extra_body={"no_such_field": 1}),
                      litellm.BadRequestError)
    long_ask = [{"role": "user", "content": LONG}]
    refused = litellm_error(stack, messages=long_ask, max_tokens=1000,
                            extra_body={"context_length_exceeded_behavior": "error"})
    assert isinstance(refused, litellm.ContextWindowExceededError), refused
    too_long = litellm_error(stack, messages=[{"role": "user", "content": LONG * 3}])
    assert isinstance(too_long, litellm.ContextWindowExceededError), too_long


def test_worker_messages_name_the_model_asked(stack: Stack) -> None:
    client = openai.OpenAI(base_url=f"{stack.base_url}/inference/v1", api_key=stack.api_key,
                           max_retries=0)
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=stack.model, max_tokens=4, messages=[
            {"role": "user", "content": [{"type": "text", "text": "What is it?"}, image]}])
    message = refused.value.body["message"]  # type: ignore[index]  (the SDK unwraps "error")
    assert stack.model in message, message
    assert "smollm2 " not in message.replace(stack.model, "")  # the worker's served name
