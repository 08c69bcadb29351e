from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from gateway.fireworks.protocol import ChatCompletionRequest, CompletionRequest
from gateway.validation import validation_message

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


def param_for(model: type[ChatCompletionRequest | CompletionRequest],
              body: dict[str, Any]) -> str | None:
    with pytest.raises(ValidationError) as info:
        model.model_validate(body)
    return validation_message(info.value)[1]


# Every documented range edge (one step past it) and type error names its field.
TABLE: list[tuple[str, Any]] = [
    ("temperature", -0.01), ("temperature", 2.01), ("temperature", "hot"),
    ("top_p", -0.1), ("top_p", 1.01), ("top_k", -1), ("top_k", 101), ("top_k", 1.5),
    ("min_p", 1.5), ("typical_p", -0.5), ("frequency_penalty", -2.01),
    ("frequency_penalty", 2.01), ("presence_penalty", 2.5), ("repetition_penalty", -0.1),
    ("repetition_penalty", 2.01), ("n", 0), ("n", 129), ("logprobs", 6), ("logprobs", -1),
    ("top_logprobs", 6), ("top_logprobs", -1), ("max_tokens", -1), ("max_tokens", "many"),
    ("max_completion_tokens", -1), ("echo_last", -1), ("min_tokens", -1),
    ("prompt_cache_max_len", -1), ("logit_bias", {"5": 200.5}), ("logit_bias", {"5": -201}),
    ("logit_bias", {"word": 1}), ("context_length_exceeded_behavior", "wrap"),
    ("service_tier", "gold"), ("reasoning_history", "all"), ("stream", "yes"),
    ("stop", ["a", "b", "c", "d", "e"]), ("stop", 5), ("seed", "x"), ("echo", "maybe"),
    ("response_format", {"type": "xml"}), ("thinking", {"type": "enabled",
                                                        "budget_tokens": 10}),
    ("stream_options", {"include_usage": True, "other": 1}), ("metadata", {"a": 1}),
]


@pytest.mark.parametrize("field,value", TABLE)
def test_validation_table_names_the_field(field: str, value: Any) -> None:
    for model, base in ((ChatCompletionRequest, CHAT), (CompletionRequest,
                                                        {"model": "m", "prompt": "p"})):
        param = param_for(model, base | {field: value})
        assert param is not None and param.split(".")[0].split("[")[0] == field, param


def test_documented_edges_are_accepted() -> None:
    edges = {"temperature": 2.0, "top_p": 1.0, "top_k": 100, "min_p": 0.0, "n": 128,
             "logprobs": 5, "top_logprobs": 5, "repetition_penalty": 2.0,
             "frequency_penalty": -2.0, "logit_bias": {"5": 200, "6": -200},
             "stop": ["a", "b", "c", "d"], "max_tokens": 0}
    ChatCompletionRequest.model_validate(CHAT | edges)


def test_mutually_exclusive_fields() -> None:
    assert "cannot both be set" in message_for(
        ChatCompletionRequest, CHAT | {"max_tokens": 1, "max_completion_tokens": 1})
    assert param_for(ChatCompletionRequest, CHAT | {
        "thinking": {"type": "disabled"}, "reasoning_effort": "low"}) == "thinking"


def test_undocumented_fields_real_clients_send_are_accepted() -> None:
    request = CompletionRequest.model_validate({
        "model": "m", "prompt": [1, 2, 3], "min_tokens": 2, "prompt_cache_max_len": 0,
        "stream_options": {"include_usage": True}})
    assert request.min_tokens == 2 and request.stream_options is not None


def test_empty_messages_and_prompts_are_rejected() -> None:
    message_for(ChatCompletionRequest, CHAT | {"messages": []})
    assert "prompt must not be empty" in message_for(CompletionRequest,
                                                     {"model": "m", "prompt": ["a", ""]})
