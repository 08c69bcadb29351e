"""The pure half of batch: input lines read and checked (a table of inputs and what each
becomes), the groups by prompt head, and the output lines in each API's shape."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from gateway.batch.lines import (
    FileRefused,
    Line,
    Result,
    Spec,
    dataset_line,
    groups,
    openai_line,
    prompt_head,
    read,
    read_one,
)

OPENAI = Spec(endpoint="/v1/chat/completions")
FIREWORKS = Spec(model="accounts/a/models/m", parameters={"max_tokens": 9, "top_k": 3})
CHAT = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(("raw", "spec", "expected"), [
    ({"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": CHAT},
     OPENAI, ("a", "/chat/completions", CHAT, None)),
    ({"custom_id": "a", "url": "/v1/chat/completions", "body": CHAT},  # method defaults
     OPENAI, ("a", "/chat/completions", CHAT, None)),
    ({"custom_id": "a", "method": "GET", "url": "/v1/chat/completions", "body": CHAT},
     OPENAI, ("a", "/chat/completions", None, "method must be POST")),
    ({"custom_id": "a", "url": "/v1/embeddings", "body": CHAT}, OPENAI,
     ("a", "/chat/completions", None,
      "url '/v1/embeddings' is not the batch's endpoint /v1/chat/completions")),
    ({"url": "/v1/chat/completions", "body": CHAT}, OPENAI,
     ("line-1", "", None, "custom_id must be a non-empty string")),
    ({"custom_id": 7, "url": "/v1/chat/completions", "body": CHAT}, OPENAI,
     ("line-1", "", None, "custom_id must be a non-empty string")),
    ({"custom_id": "a", "url": "/v1/chat/completions", "body": [1]}, OPENAI,
     ("a", "/chat/completions", None, "body must be an object")),
    ({"custom_id": "a", "url": "/v1/chat/completions", "body": CHAT | {"stream": True}},
     OPENAI, ("a", "/chat/completions", None, "stream is not supported in a batch")),
    ({"custom_id": "a", "body": CHAT}, FIREWORKS,
     ("a", "/chat/completions", CHAT | {"max_tokens": 9, "top_k": 3,
                                        "model": "accounts/a/models/m"}, None)),
    ({"body": CHAT | {"max_tokens": 2, "model": "theirs"}}, FIREWORKS,  # own fields win,
     ("line-1", "/chat/completions", CHAT | {"max_tokens": 2, "top_k": 3,  # not the model
                                             "model": "accounts/a/models/m"}, None)),
    ({"custom_id": "p", "body": {"prompt": "Once"}}, FIREWORKS,
     ("p", "/completions", {"prompt": "Once", "max_tokens": 9, "top_k": 3,
                            "model": "accounts/a/models/m"}, None)),
    ([1, 2], OPENAI, ("line-1", "", None, "line 1 is not a JSON object")),
])
def test_a_line_becomes(raw: Any, spec: Spec,
                        expected: tuple[str, str, dict[str, Any] | None, str | None]) -> None:
    line = read_one(orjson.dumps(raw), 0, spec)
    assert (line.custom_id, line.path, line.body, line.error) == expected


def test_a_file_is_read_line_by_line_with_its_places() -> None:
    data = (b'{"custom_id": "a", "url": "/v1/chat/completions", "body": {}}\n\n'
            b'not json\n'
            b'{"custom_id": "a", "url": "/v1/chat/completions", "body": {}}\r\n')
    lines, spans = read(data, OPENAI, 10)
    assert [(line.number, line.custom_id, line.error) for line in lines] == [
        (0, "a", None), (1, "line-2", "line 2 is not JSON"),
        (2, "a", "custom_id 'a' is also line 1's")]
    assert [data[o:o + n].strip() for o, n in spans] == [
        data.splitlines()[0], b"not json", data.splitlines()[3].strip()]
    with pytest.raises(FileRefused, match="at most 2"):
        read(data, OPENAI, 2)
    with pytest.raises(FileRefused, match="no lines"):
        read(b"\n \n", OPENAI, 2)


def chat(number: int, system: str) -> Line:
    return Line(number, f"c{number}", "/chat/completions", {"messages": [
        {"role": "system", "content": system}, {"role": "user", "content": f"q{number}"}]})


def test_lines_sharing_a_prompts_head_are_grouped_in_order_of_their_first() -> None:
    doc_a, doc_b = "A" * 100, "B" * 100
    lines = [chat(0, doc_a), chat(1, "short"), chat(2, doc_b), chat(3, doc_a),
             Line(4, "bad", "", None, "refused"), chat(5, doc_b), chat(6, doc_a)]
    assert groups(lines, 50) == [[0, 3, 6], [1], [2, 5]]
    assert groups(lines, 0) == [[0], [1], [2], [3], [5], [6]]
    assert prompt_head({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "one"}, {"type": "text", "text": "two"}]}]}, 100) \
        == "user\0onetwo\0"
    assert prompt_head({"prompt": "abcdef"}, 3) == "abc"


@pytest.mark.parametrize(("result", "openai", "fireworks"), [
    (Result(0, "a", "r1", 200, {"choices": []}),
     {"custom_id": "a", "response": {"status_code": 200, "request_id": "r1",
                                     "body": {"choices": []}}, "error": None},
     {"custom_id": "a", "response": {"choices": []}}),
    (Result(1, "b", "r2", 400, {"error": {"message": "no", "code": "INVALID"}}),
     {"custom_id": "b", "response": {"status_code": 400, "request_id": "r2", "body": {
         "error": {"message": "no", "code": "INVALID"}}}, "error": None},
     {"custom_id": "b", "error": {"message": "no", "code": "INVALID"}, "status_code": 400}),
    (Result(2, "c", "", 0, error=("batch_expired", "late")),
     {"custom_id": "c", "response": None, "error": {"code": "batch_expired",
                                                    "message": "late"}},
     {"custom_id": "c", "error": {"code": "batch_expired", "message": "late"},
      "status_code": 0}),
])
def test_a_result_in_each_apis_output(result: Result, openai: dict[str, Any],
                                      fireworks: dict[str, Any]) -> None:
    written = openai_line(result)
    assert written.pop("id").startswith("batch_req_")
    assert written == openai
    assert dataset_line(result) == fireworks
    assert openai_line(result)["id"] == openai_line(result)["id"]  # the same on a re-run
