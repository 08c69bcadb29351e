"""The Fireworks behaviours that differ from OpenAI, item by item (docs/fireworks-api.md),
through the gateway and a real SmolLM2 worker."""

from __future__ import annotations

import json
from typing import Any

import httpx
import orjson
import pytest

from tests.e2e.conftest import Stack

pytestmark = pytest.mark.e2e
LONG = "one two three four five six seven eight nine ten " * 185  # ~1850 tokens


def post(stack: Stack, path: str, body: dict[str, Any], model: str | None = None,
         **headers: str) -> httpx.Response:
    return httpx.post(f"{stack.base_url}/inference/v1/{path}",
                      headers=stack.headers | headers,
                      json={"model": model or stack.model} | body, timeout=300)


def stream(stack: Stack, path: str, body: dict[str, Any]) -> tuple[httpx.Headers,
                                                                   list[dict[str, Any]]]:
    with httpx.stream("POST", f"{stack.base_url}/v1/{path}", headers=stack.headers,
                      json={"model": stack.model, "stream": True} | body, timeout=300) as r:
        assert r.status_code == 200, r.read()
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    return r.headers, [orjson.loads(line[6:]) for line in lines[:-1]]


def test_usage_placement_in_streams(stack: Stack) -> None:
    body = {"prompt": "Count: 1, 2, 3,", "max_tokens": 6, "n": 2, "temperature": 1.0}
    _, chunks = stream(stack, "completions", body)
    finishing = [c for c in chunks if c["choices"][0]["finish_reason"]]
    assert len(finishing) == 2 and all(c["choices"] for c in chunks)
    assert all(c["usage"]["completion_tokens"] == 12 for c in finishing)
    assert all(c["usage"] is None for c in chunks if not c["choices"][0]["finish_reason"])
    _, chunks = stream(stack, "completions", body | {"stream_options": {"include_usage": True}})
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 12
    assert all(c["usage"] is None for c in chunks[:-1])
    _, chunks = stream(stack, "completions", body | {"stream_options": {"include_usage": False}})
    assert all(c["usage"] is None and c["choices"] for c in chunks)


def test_truncate_lowers_max_tokens_and_error_refuses(stack: Stack) -> None:
    body = {"prompt": LONG, "max_tokens": 2000, "temperature": 0, "ignore_eos": True}
    truncated = post(stack, "completions", body)
    assert truncated.status_code == 200, truncated.text
    usage = truncated.json()["usage"]
    assert truncated.json()["choices"][0]["finish_reason"] == "length"
    assert usage["prompt_tokens"] + usage["completion_tokens"] == 2048
    options = json.loads(truncated.headers["fireworks-sampling-options"])
    assert options["max_tokens"] == usage["completion_tokens"]
    refused = post(stack, "completions", body | {"context_length_exceeded_behavior": "error"})
    assert refused.status_code == 400
    message = refused.json()["error"]["message"]
    assert str(usage["prompt_tokens"]) in message and "2000" in message and "2048" in message
    for mode in ("truncate", "error"):
        too_long = post(stack, "completions", {"prompt": LONG * 4, "max_tokens": 1,
                                               "context_length_exceeded_behavior": mode})
        assert too_long.status_code == 400, (mode, too_long.text)
        assert too_long.json()["error"]["code"] == "INVALID_ARGUMENT"


def test_stop_sequence_is_kept_in_the_text(stack: Stack) -> None:
    response = post(stack, "completions", {"prompt": "1, 2, 3, 4,", "max_tokens": 30,
                                           "temperature": 0, "stop": [" 6"]})
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["text"].endswith(" 6"), choice["text"]


def test_defaults_come_from_the_deployment_and_model(stack: Stack) -> None:
    model = "accounts/fireworks/models/smollm2-defaults"
    first = post(stack, "chat/completions", {"messages": [{"role": "user", "content": "Hi"}]},
                 model=model)
    options = json.loads(first.headers["fireworks-sampling-options"])
    assert options["temperature"] == 0.0 and options["top_k"] == 7
    assert options["max_tokens"] == 7 and first.json()["usage"]["completion_tokens"] <= 7
    second = post(stack, "chat/completions", {"messages": [{"role": "user", "content": "Hi"}]},
                  model=model)
    assert first.json()["choices"][0]["message"] == second.json()["choices"][0]["message"]
    completion = post(stack, "completions", {"prompt": "Once", "ignore_eos": True})
    assert completion.json()["usage"]["completion_tokens"] == 16  # Fireworks' default
    # greedy: a sampled answer may run to the 2,048-token default on a CPU worker
    chat = post(stack, "chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                            "temperature": 0})
    assert json.loads(chat.headers["fireworks-sampling-options"])["max_tokens"] <= 2048


def test_legacy_logprobs_tokens_concatenate_to_the_text(stack: Stack) -> None:
    for path, body in (("completions", {"prompt": "The capital of France is"}),
                       ("chat/completions", {"messages": [{"role": "user",
                                                           "content": "Say hello"}]})):
        response = post(stack, path, body | {"max_tokens": 8, "temperature": 0, "logprobs": 3})
        choice = response.json()["choices"][0]
        text = choice.get("text") if "text" in choice else choice["message"]["content"]
        logprobs = choice["logprobs"]
        assert "".join(logprobs["tokens"]) == text
        assert len(logprobs["token_ids"]) == len(logprobs["tokens"])
        assert all(1 <= len(top) <= 4 for top in logprobs["top_logprobs"])
        assert logprobs["text_offset"][0] == 0


def test_openai_style_logprobs_with_ids_bytes_offsets(stack: Stack) -> None:
    for path, body in (("completions", {"prompt": "The capital of France is"}),
                       ("chat/completions", {"messages": [{"role": "user",
                                                           "content": "Say hello"}]})):
        response = post(stack, path, body | {"max_tokens": 6, "temperature": 0,
                                             "logprobs": True, "top_logprobs": 2,
                                             "return_token_ids": True})
        choice = response.json()["choices"][0]
        content = choice["logprobs"]["content"]
        assert [c["token_id"] for c in content] == choice["token_ids"]
        offset = 0
        for entry in content:
            assert bytes(entry["bytes"]).decode() == entry["token"]
            assert entry["text_offset"] == offset
            offset += len(entry["token"])
            assert len(entry["top_logprobs"]) == 2
            assert all("token_id" in alt for alt in entry["top_logprobs"])
    too_many = post(stack, "completions", {"prompt": "x", "logprobs": True, "top_logprobs": 6})
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "top_logprobs"


def test_echo_and_score_only_requests(stack: Stack) -> None:
    echoed = post(stack, "completions", {"prompt": "The capital of France is",
                                         "max_tokens": 3, "temperature": 0, "echo": True})
    assert echoed.json()["choices"][0]["text"].startswith("The capital of France is")
    scored = post(stack, "completions", {"prompt": "The capital of France is", "max_tokens": 0,
                                         "echo": True, "logprobs": 1})
    choice = scored.json()["choices"][0]
    assert choice["text"] == "The capital of France is"
    assert choice["logprobs"]["token_logprobs"][0] is None
    assert scored.json()["usage"]["completion_tokens"] == 0
    last = post(stack, "completions", {"prompt": "The capital of France is", "max_tokens": 2,
                                       "temperature": 0, "echo_last": 2, "logprobs": 0})
    choice = last.json()["choices"][0]
    assert choice["text"].startswith(" France is") and len(choice["logprobs"]["tokens"]) == 4
    chat = post(stack, "chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                            "max_tokens": 3, "echo": True})
    content = chat.json()["choices"][0]["message"]["content"]
    assert content.startswith("<|im_start|>system") and "<|im_start|>user\nHi" in content


def test_token_ids_raw_output_and_perf_metrics(stack: Stack) -> None:
    response = post(stack, "chat/completions", {
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0,
        "return_token_ids": True, "raw_output": True, "perf_metrics_in_response": True})
    body = response.json()
    choice = body["choices"][0]
    assert body["prompt_token_ids"] and len(choice["token_ids"]) == 4
    assert choice["raw_output"]["completion"] == choice["message"]["content"]
    assert choice["raw_output"]["prompt_token_ids"] == body["prompt_token_ids"]
    metrics = body["perf_metrics"]
    assert metrics["prompt-tokens"] == body["usage"]["prompt_tokens"] == \
        int(response.headers["fireworks-prompt-tokens"]) == len(body["prompt_token_ids"])
    ttft = float(response.headers["fireworks-server-time-to-first-token"])
    total = float(response.headers["fireworks-server-processing-time"])
    assert 0 < ttft <= total
    assert response.headers["fireworks-deployment"] == \
        "accounts/fireworks/deployments/smollm2-135m-instruct"
    completion = post(stack, "completions", {"prompt": ["Hello", "World"], "n": 2,
                                             "max_tokens": 2, "return_token_ids": True})
    choices = completion.json()["choices"]
    assert sorted(c["index"] for c in choices) == [0, 1, 2, 3]
    assert all(c["prompt_token_ids"] for c in choices)
    ids = post(stack, "completions", {"prompt": [504, 3575, 282], "max_tokens": 2})
    assert ids.json()["usage"]["prompt_tokens"] == 3


def test_streaming_headers_and_final_chunk_metrics(stack: Stack) -> None:
    headers, chunks = stream(stack, "chat/completions", {
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5,
        "perf_metrics_in_response": True, "return_token_ids": True})
    assert int(headers["fireworks-prompt-tokens"]) > 0
    assert float(headers["fireworks-server-time-to-first-token"]) > 0
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": None}
    assert chunks[0]["prompt_token_ids"]
    assert "perf_metrics" in chunks[-1] and all("perf_metrics" not in c for c in chunks[:-1])
    assert chunks[-1]["perf_metrics"]["prompt-tokens"] == int(headers["fireworks-prompt-tokens"])


def test_extensions_travel_and_are_reported(stack: Stack) -> None:
    response = post(stack, "completions", {
        "prompt": "Once upon a time", "max_tokens": 12, "temperature": 1.0, "seed": 3,
        "mirostat_target": 3.0, "top_p": 0.5, "typical_p": 0.9, "repetition_penalty": 1.2,
        "min_p": 0.1, "prompt_cache_key": "k", "service_tier": "priority",
        "metadata": {"a": "b"}})
    assert response.status_code == 200, response.text
    options = json.loads(response.headers["fireworks-sampling-options"])
    assert options["mirostat_target"] == 3.0 and options["mirostat_lr"] == 0.1
    assert options["repetition_penalty"] == 1.2
    # typical_p: no such sampler; priority: this worker runs no priority scheduler
    assert set(options["ignored"]) == {"top_p", "min_p", "typical_p", "service_tier"}
    assert options["top_p"] == 1.0


def test_structured_output_and_tools(stack: Stack) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}},
              "required": ["city"], "additionalProperties": False}
    for fmt in ({"type": "json_object", "schema": schema},
                {"type": "json_schema", "json_schema": {"name": "c", "schema": schema}}):
        response = post(stack, "chat/completions", {
            "messages": [{"role": "user", "content": "Capital of France as JSON"}],
            "max_tokens": 40, "temperature": 0, "response_format": fmt})
        assert response.status_code == 200, response.text
        assert set(json.loads(response.json()["choices"][0]["message"]["content"])) == {"city"}
    grammar = post(stack, "completions", {"prompt": "Answer yes or no:", "max_tokens": 5,
                                          "response_format": {"type": "grammar",
                                                              "grammar": 'root ::= "yes" | "no"'}})
    assert grammar.status_code == 200, grammar.text
    assert grammar.json()["choices"][0]["text"] in ("yes", "no")
    tools = post(stack, "chat/completions", {
        "messages": [{"role": "user", "content": "Weather?"}], "tool_choice": "any",
        "tools": [{"type": "function", "function": {"name": "weather", "parameters": {}}}]})
    assert tools.status_code == 400 and tools.json()["error"]["param"] == "tools"


def test_errors_use_the_envelope_and_real_statuses(stack: Stack) -> None:
    dead = post(stack, "chat/completions", {"messages": [{"role": "user", "content": "x"}]},
                model="accounts/fireworks/models/dead")
    assert dead.status_code == 503 and "retry-after" in dead.headers
    assert dead.json()["error"]["code"] == "UNAVAILABLE"
    wrong_method = httpx.get(f"{stack.base_url}/v1/chat/completions", headers=stack.headers)
    assert wrong_method.status_code == 405
    assert wrong_method.json()["error"]["code"] == "METHOD_NOT_ALLOWED"
    not_json = httpx.post(f"{stack.base_url}/v1/completions", headers=stack.headers,
                          content=b"{nope")
    assert not_json.status_code == 400
    request_id = post(stack, "completions", {"prompt": "x", "max_tokens": 1},
                      **{"x-request-id": "my-id-123"})
    assert request_id.headers["x-request-id"] == "my-id-123"
    pinned = post(stack, "completions", {"prompt": "x", "max_tokens": 1},
                  model=f"{stack.model}#accounts/fireworks/deployments/smollm2-135m-instruct")
    assert pinned.status_code == 200 and pinned.json()["model"].endswith("instruct")


def test_models_list_has_context_lengths(stack: Stack) -> None:
    response = httpx.get(f"{stack.base_url}/inference/v1/models", headers=stack.headers)
    models = {m["id"]: m for m in response.json()["data"]}
    assert models[stack.model]["context_length"] == 2048
    assert "accounts/other/models/private" not in models
    assert all({"id", "created", "owned_by"} <= set(m) for m in models.values())
