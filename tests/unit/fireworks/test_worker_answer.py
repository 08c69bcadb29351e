"""The checks on worker answers and the usage coercion, as tables."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.api import coerce_usage
from gateway.errors import WorkerFault
from gateway.fireworks.worker_answer import check_chunk, check_completion

CHOICE = {"index": 0, "text": "hi", "finish_reason": "stop"}
MESSAGE = {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": None}
DELTA = {"index": 0, "delta": {"content": "hi"}, "finish_reason": None}
BASE = {"id": "x", "object": "text_completion", "created": 1}


@pytest.mark.parametrize("data,chat,ok", [
    (BASE | {"choices": [CHOICE]}, False, True),
    (BASE | {"choices": [MESSAGE]}, True, True),
    (BASE | {"choices": [CHOICE | {"text": None}]}, False, True),
    (BASE | {"choices": []}, False, False),
    (BASE, False, False),
    ({"choices": [CHOICE]}, False, False),  # no id
    (BASE | {"id": 5, "choices": [CHOICE]}, False, False),
    (BASE | {"created": "now", "choices": [CHOICE]}, False, False),
    (BASE | {"choices": "x"}, False, False),
    (BASE | {"choices": ["x"]}, False, False),
    (BASE | {"choices": [CHOICE | {"index": -1}]}, False, False),
    (BASE | {"choices": [CHOICE | {"index": True}]}, False, False),
    (BASE | {"choices": [CHOICE | {"text": 5}]}, False, False),
    (BASE | {"choices": [CHOICE | {"finish_reason": 1}]}, False, False),
    (BASE | {"choices": [MESSAGE | {"message": "hi"}]}, True, False),
    (BASE | {"choices": [CHOICE]}, True, False),  # a completions choice on chat
    ({"error": {"message": "boom"}}, False, False),
    ([BASE | {"choices": [CHOICE]}], False, False),
    ("text", False, False),
    (None, False, False),
])
def test_check_completion(data: Any, chat: bool, ok: bool) -> None:
    if ok:
        assert check_completion(data, chat) is data
    else:
        with pytest.raises(WorkerFault) as caught:
            check_completion(data, chat)
        assert caught.value.status == 502 and caught.value.replica_fault


@pytest.mark.parametrize("data,chat,ok", [
    (BASE | {"choices": [DELTA]}, True, True),
    (BASE | {"choices": [], "usage": {"prompt_tokens": 1}}, True, True),  # usage-only
    (BASE | {"choices": [CHOICE]}, False, True),
    (BASE | {"choices": [DELTA | {"delta": None}]}, True, False),
    ({"error": {"message": "boom", "code": 500}}, True, False),  # vLLM's in-stream error
    ({"object": "error", "message": "x"}, True, False),
    ([1, 2], True, False),
])
def test_check_chunk(data: Any, chat: bool, ok: bool) -> None:
    if ok:
        assert check_chunk(data, chat) is data
    else:
        with pytest.raises(WorkerFault):
            check_chunk(data, chat)


@pytest.mark.parametrize("usage,expected", [
    ({"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5,
      "prompt_tokens_details": {"cached_tokens": 1}}, (3, 2, 5, 1)),
    ({"prompt_tokens": 3}, (3, 0, 0, 0)),
    ({"prompt_tokens": "3", "completion_tokens": None, "total_tokens": 2.0}, (0, 0, 2, 0)),
    ({"prompt_tokens": -4, "completion_tokens": True, "total_tokens": 1.5}, (0, 0, 0, 0)),
    ({"prompt_tokens_details": None}, (0, 0, 0, 0)),
    ({"prompt_tokens_details": {"cached_tokens": "many"}}, (0, 0, 0, 0)),
])
def test_coerce_usage(usage: dict[str, Any], expected: tuple[int, int, int, int]) -> None:
    out = coerce_usage(usage)
    assert out is not None
    assert (out["prompt_tokens"], out["completion_tokens"], out["total_tokens"],
            out["prompt_tokens_details"]["cached_tokens"]) == expected
    assert all(type(out[k]) is int for k in ("prompt_tokens", "completion_tokens",
                                             "total_tokens"))


@pytest.mark.parametrize("usage", [None, "x", [1], 3])
def test_no_usage_object_is_none(usage: Any) -> None:
    assert coerce_usage(usage) is None
