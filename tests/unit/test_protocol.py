from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from gateway.protocol import ChatCompletionRequest, CompletionRequest
from gateway.routes import validation_message

CHAT: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def message_for(model: type[ChatCompletionRequest | CompletionRequest],
                body: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as info:
        model.model_validate(body)
    return validation_message(info.value)[0]


def test_unknown_fields_are_named_like_fireworks() -> None:
    assert message_for(ChatCompletionRequest, CHAT | {"foo": 1}) == \
        "Extra inputs are not permitted, field: 'foo'"
    nested = CHAT | {"messages": [{"role": "user", "content": "a"},
                                  {"role": "assistant", "content": "b", "reasoning": "x"}]}
    assert message_for(ChatCompletionRequest, nested) == \
        "Extra inputs are not permitted, field: 'messages[1].reasoning'"


@pytest.mark.parametrize("field,value", [
    ("temperature", 2.5), ("top_k", 101), ("top_logprobs", 6), ("n", 0), ("n", 129),
    ("logprobs", 6), ("repetition_penalty", 2.5), ("logit_bias", {"5": 201}),
    ("context_length_exceeded_behavior", "wrap"), ("stop", ["a", "b", "c", "d", "e"]),
])
def test_documented_ranges_are_enforced(field: str, value: Any) -> None:
    assert field in message_for(ChatCompletionRequest, CHAT | {field: value}) or \
        "stop" in field


def test_mutually_exclusive_fields() -> None:
    assert "cannot both be set" in message_for(
        ChatCompletionRequest, CHAT | {"max_tokens": 1, "max_completion_tokens": 1})


def test_undocumented_fields_real_clients_send_are_accepted() -> None:
    request = CompletionRequest.model_validate({
        "model": "m", "prompt": [1, 2, 3], "min_tokens": 2, "prompt_cache_max_len": 0,
        "stream_options": {"include_usage": True}})
    assert request.min_tokens == 2 and request.stream_options is not None


def test_empty_messages_and_prompts_are_rejected() -> None:
    message_for(ChatCompletionRequest, CHAT | {"messages": []})
    assert "prompt must not be empty" in message_for(CompletionRequest,
                                                     {"model": "m", "prompt": ["a", ""]})
