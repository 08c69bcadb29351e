"""Worker answer -> Fireworks answer, as tables: what a vLLM choice (whole or streamed) turns
into under each Plan. No worker; the chunks are what vLLM 0.32 sends."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from gateway.fireworks.choices import ChoiceState, shape_choice
from gateway.fireworks.plain import shape_completion
from gateway.fireworks.sampling import Plan
from gateway.fireworks.stream import StreamReframer

BASE = {"id": "cmpl-1", "created": 7, "usage": {"prompt_tokens": 3, "completion_tokens": 2,
                                                "total_tokens": 5}}
CHAT = Plan(chat=True, max_tokens=16)
TEXT = Plan(chat=False, max_tokens=16)
LEGACY = Plan(chat=False, logprobs="legacy", max_tokens=16)
CONTENT = Plan(chat=True, logprobs="content", max_tokens=16)
VOCAB = {1: "Hel", 2: "lo", 3: " x"}


def lp(token: int, value: float, top: dict[int, float]) -> dict[str, Any]:
    return {"token": f"token_id:{token}", "logprob": value,
            "top_logprobs": [{"token": f"token_id:{t}", "logprob": v} for t, v in top.items()]}


@pytest.mark.parametrize("plan,choice,expected", [
    # completions: text and finish reason pass; vLLM's abort is Fireworks' error
    (TEXT, {"index": 0, "text": "Hello", "finish_reason": "length"},
     {"index": 0, "text": "Hello", "finish_reason": "length"}),
    (TEXT, {"index": 0, "text": "Hel", "finish_reason": "abort"},
     {"text": "Hel", "finish_reason": "error"}),
    # chat: only documented message keys; vLLM's `reasoning` is reasoning_content
    (CHAT, {"index": 0, "finish_reason": "stop", "message": {
        "role": "assistant", "content": "Hi", "reasoning": "think", "refusal": None,
        "annotations": None}},
     {"message": {"role": "assistant", "content": "Hi", "reasoning_content": "think",
                  "tool_calls": None}, "finish_reason": "stop"}),
    (CHAT, {"index": 0, "finish_reason": "tool_calls", "message": {
        "role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}},
     {"message": {"role": "assistant", "content": None, "reasoning_content": None,
                  "tool_calls": [{"id": "c1", "type": "function",
                                  "function": {"name": "f", "arguments": "{}"}}]},
      "finish_reason": "tool_calls"}),
    # legacy logprobs: token texts from the vocabulary, offsets, token ids
    (LEGACY, {"index": 0, "text": "Hello", "finish_reason": "stop", "logprobs": {
        "tokens": ["token_id:1", "token_id:2"], "token_logprobs": [-0.5, -0.25],
        "top_logprobs": [{"token_id:1": -0.5}, {"token_id:2": -0.25, "token_id:3": -2.0}]}},
     {"text": "Hello", "logprobs": {"tokens": ["Hel", "lo"], "token_ids": [1, 2],
                                    "token_logprobs": [-0.5, -0.25],
                                    "top_logprobs": [{"Hel": -0.5}, {"lo": -0.25, " x": -2.0}],
                                    "text_offset": [0, 3]}}),
])
def test_whole_answers(plan: Plan, choice: dict[str, Any], expected: dict[str, Any]) -> None:
    out, usage, _ = shape_completion(BASE | {"choices": [choice]}, plan, "accounts/a/models/m",
                                     VOCAB)
    shaped = out["choices"][0]
    for key, value in expected.items():
        assert shaped[key] == value, key
    assert out["model"] == "accounts/a/models/m" and usage is not None
    assert usage | BASE["usage"] == usage  # vLLM's counts, plus cached tokens (0)
    assert out["object"] == ("chat.completion" if plan.chat else "text_completion")


def test_content_logprobs() -> None:
    choice = {"index": 0, "finish_reason": "stop", "message": {"role": "assistant",
                                                               "content": "Hello"},
              "logprobs": {"content": [lp(1, -0.5, {1: -0.5, 3: -1.0}), lp(2, -0.25, {})]}}
    out, _, _ = shape_completion(BASE | {"choices": [choice]}, CONTENT, "m", VOCAB)
    content = out["choices"][0]["logprobs"]["content"]
    assert [c["token"] for c in content] == ["Hel", "lo"]
    assert [c["text_offset"] for c in content] == [0, 3]
    assert content[0]["top_logprobs"][1] == {"token": " x", "logprob": -1.0, "token_id": 3,
                                             "bytes": list(b" x")}


def test_echo_goes_in_front_of_each_prompts_choices() -> None:
    plan = Plan(chat=False, echo=True, n=2, max_tokens=16)
    choices = [{"index": i, "text": f"t{i}", "finish_reason": "stop"} for i in range(4)]
    out, _, _ = shape_completion(BASE | {"choices": choices}, plan, "m", {}, ["A", "B"])
    assert [c["text"] for c in out["choices"]] == ["At0", "At1", "Bt2", "Bt3"]


@pytest.mark.parametrize("delta,expected", [
    ({"role": "assistant", "content": ""}, {"role": "assistant", "content": None}),
    ({"content": "Hi"}, {"content": "Hi"}),
    ({"reasoning": "hmm"}, {"reasoning_content": "hmm"}),
    ({"tool_calls": [{"index": 0, "function": {"arguments": "{"}}]},
     {"tool_calls": [{"index": 0, "function": {"arguments": "{"}}]}),
])
def test_stream_deltas(delta: dict[str, Any], expected: dict[str, Any]) -> None:
    shaped = shape_choice({"index": 0, "delta": delta, "finish_reason": None}, CHAT, {},
                          ChoiceState(), chunk=True)
    assert shaped["delta"] == expected


def test_a_stream_reframed() -> None:
    """vLLM's chunks (usage on each, then a usage-only one) -> Fireworks' (usage on the
    finish chunk, none before)."""
    reframer = StreamReframer(CHAT, "m", lambda usage, engine, complete: {})
    usage = {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
    sent = reframer.chunk({"id": "c", "created": 1, "usage": usage, "choices": [
        {"index": 0, "delta": {"role": "assistant", "content": "Hi"}, "finish_reason": None}]})
    sent += reframer.chunk({"id": "c", "created": 1, "usage": usage, "choices": [
        {"index": 0, "delta": {}, "finish_reason": "stop"}]})
    sent += reframer.chunk({"id": "c", "created": 1, "usage": usage, "choices": []})
    sent += reframer.end()
    chunks = [orjson.loads(part.removeprefix(b"data: ")) for part in sent]
    assert [c["choices"][0]["delta"] for c in chunks] == [
        {"role": "assistant", "content": "Hi"}, {}]
    assert chunks[0]["usage"] is None and chunks[-1]["usage"] | usage == chunks[-1]["usage"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
