"""Which streams may be continued on another worker, and what the continuation is (pure;
gateway/fireworks/continuation.py). One row per sampling and output feature: carried
exactly, or declined naming the feature, so that nothing changes meaning after a seam."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.config import Settings
from gateway.controlplane.registry import Deployment
from gateway.fireworks.chat import chat_body
from gateway.fireworks.completions import completion_body
from gateway.fireworks.continuation import (
    as_first_worker,
    continuation_body,
    whole_usage,
)
from gateway.fireworks.protocol import ChatCompletionRequest, CompletionRequest
from gateway.fireworks.sampling import Plan

PLAIN = Deployment(id="d", account="acct", model="accounts/acct/models/m",
                   context_length=4096, tool_parser="hermes")
REASONING = PLAIN.model_copy(update={"reasoning_parser": "deepseek_r1"})
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
IMAGE = [{"type": "text", "text": "what is it?"},
         {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]

# (fields, endpoints, deployment) -> None (carried) or the feature that declines it
CARRIED: list[tuple[dict[str, Any], str]] = [
    ({}, "both"),
    ({"temperature": 0.0}, "both"),
    ({"temperature": 0.7, "top_p": 0.9, "top_k": 40, "min_p": 0.05}, "both"),
    ({"max_tokens": 50, "min_tokens": 10}, "both"),
    ({"logit_bias": {"5": 10.0}, "ignore_eos": True}, "both"),
    ({"repetition_penalty": 1.3}, "both"),
    ({"logprobs": True, "top_logprobs": 2}, "chat"),
    ({"logprobs": 2}, "completions"),
    ({"return_token_ids": True, "raw_output": True}, "both"),
    ({"service_tier": "priority"}, "both"),
    ({"prompt": [1, 2, 3]}, "completions"),
]
DECLINED: list[tuple[dict[str, Any], str, str]] = [
    ({"n": 2}, "both", "n"),
    ({"seed": 7}, "both", "seed"),
    ({"presence_penalty": 0.5}, "both", "presence_penalty"),
    ({"frequency_penalty": 0.5}, "both", "frequency_penalty"),
    ({"mirostat_target": 3.0}, "both", "mirostat_target"),
    ({"response_format": {"type": "json_object"}}, "both", "response_format"),
    ({"stop": ["\n"]}, "both", "stop"),
    ({"tools": TOOLS}, "chat", "tools"),
    ({"echo": True}, "both", "echo"),
    ({"prompt": ["a", "b"]}, "completions", "prompt"),
    ({"messages": [{"role": "user", "content": IMAGE}]}, "chat", "messages"),
]


def translate(endpoint: str, fields: dict[str, Any],
              deployment: Deployment = PLAIN) -> tuple[dict[str, Any], Plan]:
    if endpoint == "chat":
        chat = ChatCompletionRequest.model_validate(
            {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
            | fields)
        return chat_body(chat, deployment, Settings())
    completion = CompletionRequest.model_validate({"model": "m", "prompt": "hi",
                                                   "stream": True} | fields)
    return completion_body(completion, deployment, Settings())


def endpoints(which: str) -> tuple[str, ...]:
    return ("chat", "completions") if which == "both" else (which,)


@pytest.mark.parametrize(("fields", "which"), CARRIED, ids=lambda v: str(v))
def test_carried_features_are_continued_with_token_ids(fields: dict[str, Any],
                                                        which: str) -> None:
    for endpoint in endpoints(which):
        body, plan = translate(endpoint, fields)
        assert plan.not_continued is None, (endpoint, plan.not_continued)
        assert body["return_token_ids"] is True  # what a continuation is built from


@pytest.mark.parametrize(("fields", "which", "feature"), DECLINED, ids=lambda v: str(v))
def test_declined_features_name_themselves(fields: dict[str, Any], which: str,
                                           feature: str) -> None:
    for endpoint in endpoints(which):
        body, plan = translate(endpoint, fields)
        assert plan.not_continued == feature, endpoint
        if not plan.echo:  # (echo asks for token ids for itself)
            assert "return_token_ids" not in body or fields.get("return_token_ids")


def test_a_reasoning_parser_declines_chat_and_not_completions() -> None:
    assert translate("chat", {}, REASONING)[1].not_continued == "reasoning_effort"
    assert translate("completions", {}, REASONING)[1].not_continued is None


def test_a_request_that_does_not_stream_is_never_continued() -> None:
    body, plan = translate("completions", {"stream": False})
    assert plan.not_continued == "stream" and "return_token_ids" not in body


def test_the_continuation_carries_the_sampling_and_the_rest_of_max_tokens() -> None:
    body, _ = translate("chat", {"temperature": 0.7, "top_k": 40, "max_tokens": 50,
                                 "min_tokens": 10, "logprobs": True, "top_logprobs": 2,
                                 "repetition_penalty": 1.3, "logit_bias": {"5": 10.0}})
    body |= {"model": "served", "cache_salt": "salt", "priority": -1}
    out = continuation_body(body, [1, 2, 3], [7, 8, 9, 10], 4096)
    assert out is not None
    assert out["prompt"] == [1, 2, 3, 7, 8, 9, 10] and "messages" not in out
    assert (out["max_tokens"], out["min_tokens"]) == (46, 6)
    assert out["logprobs"] == 2 and out["return_tokens_as_token_ids"] is True
    for key in ("model", "temperature", "top_k", "logit_bias", "vllm_xargs", "cache_salt",
                "priority", "stream", "stream_options"):
        assert out[key] == body[key], key
    assert out["return_token_ids"] is True and "top_logprobs" not in out


def test_the_continuation_fits_the_context_and_may_have_nothing_left() -> None:
    body = {"max_tokens": 100, "prompt": "x"}
    out = continuation_body(body, list(range(10)), list(range(5)), context_length=20)
    assert out is not None and out["max_tokens"] == 5  # 20 - 15
    assert continuation_body(body, list(range(10)), list(range(10)), 20) is None
    assert continuation_body({"max_tokens": 5}, [1], [2, 3, 4, 5, 6], None) is None


def test_a_continuation_chunk_reads_as_the_first_workers() -> None:
    chunk = {"id": "cmpl-2", "object": "text_completion", "created": 9, "model": "served",
             "prompt_token_ids": [1, 2],
             "choices": [{"index": 0, "text": " next", "token_ids": [11], "logprobs": None,
                          "finish_reason": None, "prompt_token_ids": [1, 2]}]}
    chat = as_first_worker(chunk, True, "chatcmpl-1", 5)
    assert chat["id"] == "chatcmpl-1" and chat["created"] == 5
    assert chat["object"] == "chat.completion.chunk" and "prompt_token_ids" not in chat
    assert chat["choices"] == [{"index": 0, "delta": {"content": " next"}, "token_ids": [11],
                                "logprobs": None, "finish_reason": None}]
    completion = as_first_worker(chunk, False, "cmpl-1", 5)
    assert completion["choices"][0]["text"] == " next"
    assert "prompt_token_ids" not in completion["choices"][0]


def test_the_whole_requests_usage_bills_the_prompt_once() -> None:
    usage = {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15,
             "prompt_tokens_details": {"cached_tokens": 12}}
    assert whole_usage(usage, prompt_tokens=8, cached_tokens=0, generated_before=4) == {
        "prompt_tokens": 8, "completion_tokens": 7, "total_tokens": 15,
        "prompt_tokens_details": {"cached_tokens": 0}}
    assert whole_usage(None, 8, 0, 4) is None


def test_chat_keeps_its_number_of_alternatives_after_the_seam() -> None:
    """Completions' logprobs may name the sampled token as one alternative more than chat's
    top_logprobs asked for: a chat stream's positions keep `top` after the seam."""
    chunk = {"id": "c", "choices": [{"index": 0, "text": "a", "finish_reason": None,
                                     "logprobs": {"tokens": ["token_id:5"],
                                                  "token_logprobs": [-0.1],
                                                  "top_logprobs": [{"token_id:5": -0.1,
                                                                    "token_id:6": -2.0,
                                                                    "token_id:7": -3.0}]}}]}
    chat = as_first_worker(chunk, True, "chatcmpl-1", 5, top=2)
    assert chat["choices"][0]["logprobs"]["top_logprobs"] == [{"token_id:5": -0.1,
                                                               "token_id:6": -2.0}]
    assert chunk["choices"][0]["logprobs"]["top_logprobs"][0]["token_id:7"] == -3.0
    completion = as_first_worker(chunk, False, "cmpl-1", 5, top=None)
    assert len(completion["choices"][0]["logprobs"]["top_logprobs"][0]) == 3
