"""What a request reserves against its account's token limits before the worker counts: the
prompt estimate each Fireworks API's Call carries, and the tokens it may generate."""

from __future__ import annotations

import base64

import pytest

from gateway.config import Settings
from gateway.controlplane.registry import Deployment, Route
from gateway.fireworks.chat import MEDIA_TOKENS, ChatApi, chat_body
from gateway.fireworks.completions import CompletionsApi
from gateway.fireworks.protocol import ChatCompletionRequest, CompletionRequest

ROUTE = Route(Deployment(id="d", account="a", model="m"), "m")
IMAGE = "data:image/png;base64," + base64.b64encode(b"\x89PNG" + b"\0" * 750_000).decode()


@pytest.mark.parametrize("body,expected", [
    ({"messages": [{"role": "user", "content": "x" * 400}]}, 4 + 100),
    ({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "y" * 40},
        {"type": "image_url", "image_url": {"url": IMAGE}}]}]}, 4 + 10 + MEDIA_TOKENS),
    ({"messages": [{"role": "system", "content": "s" * 8},
                   {"role": "user", "content": None}]}, 4 + 2 + 4),
])
def test_chat_prompt_estimates(body: dict[str, object], expected: int) -> None:
    request = ChatCompletionRequest.model_validate({"model": "m"} | body)
    assert ChatApi().translate(request, ROUTE, Settings(), account="a",
                               nonce="n").prompt_estimate() == expected


@pytest.mark.parametrize("prompt,expected", [
    ("x" * 40, 11), ([1, 2, 3], 3), (["ab" * 4, "c"], 3 + 1), ([[1, 2], [3]], 3),
])
def test_completion_prompt_estimates(prompt: object, expected: int) -> None:
    call = CompletionsApi().translate(CompletionRequest(model="m", prompt=prompt), ROUTE,
                                      Settings(), account="a", nonce="n")
    assert call.prompt_estimate() == expected


def test_chat_reserves_for_every_choice() -> None:
    request = ChatCompletionRequest.model_validate(
        {"model": "m", "n": 3, "max_tokens": 10,
         "messages": [{"role": "user", "content": "hi"}]})
    _, plan = chat_body(request, Deployment(id="d", account="a", model="m"), Settings())
    assert plan.n == 3 and plan.max_tokens == 10
