"""Every field a request model accepts, one table row each: the worker request (body and
Plan) it produces, or the 400 naming it, or where it goes when it changes neither. The rows
are checked against the models themselves, so a field cannot be added without one.

In the spirit of envoyproxy/ai-gateway's translator tables; no worker, no I/O."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest

from gateway.config import Settings
from gateway.controlplane.registry import Deployment, Route
from gateway.dataplane.affinity import affinity_key
from gateway.dataplane.isolation import account_salt, isolate
from gateway.errors import GatewayError
from gateway.fireworks.chat import ChatApi, strict_when_forced
from gateway.fireworks.completions import CompletionsApi
from gateway.fireworks.embeddings import EmbeddingsApi, embedding_input
from gateway.fireworks.generation import GenerationCall
from gateway.fireworks.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
)
from gateway.fireworks.sampling import PRIORITY, Plan
from gateway.validation import known_fields, parse_body

PLAIN = Deployment(id="d", account="acct", model="accounts/acct/models/m",
                   context_length=4096, tool_parser="hermes")
REASONING = PLAIN.model_copy(update={"reasoning_parser": "deepseek_r1",
                                     "priority_scheduling": True})
EMBED = PLAIN.model_copy(update={"task": "embed"})
BASES = {"chat": {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
         "completions": {"model": "m", "prompt": "hi"},
         "embeddings": {"model": "m", "input": "hi"}}
MODELS: dict[str, type[ChatCompletionRequest | CompletionRequest | EmbeddingRequest]] = {
    "chat": ChatCompletionRequest, "completions": CompletionRequest,
    "embeddings": EmbeddingRequest}
APIS: dict[str, ChatApi | CompletionsApi | EmbeddingsApi] = {
    "chat": ChatApi(), "completions": CompletionsApi(), "embeddings": EmbeddingsApi()}
EMBEDDINGS = ("embeddings",)
BOTH = ("chat", "completions")


@dataclass
class Row:
    value: Any
    body: dict[str, Any] = field(default_factory=dict)  # expected in the worker body
    absent: tuple[str, ...] = ()  # keys the worker body must not have
    plan: dict[str, Any] = field(default_factory=dict)  # expected Plan attributes
    options: dict[str, Any] = field(default_factory=dict)  # in fireworks-sampling-options
    refused: bool = False  # a 400 whose param names the field
    where: str = ""  # where it goes when neither body nor plan changes (and why)
    endpoints: tuple[str, ...] = BOTH
    given: dict[str, Any] = field(default_factory=dict)  # other fields the row needs
    deployment: Deployment = field(default_factory=lambda: PLAIN)
    entitled: bool = True  # the account may ask for the priority tier (Route.priority_tier)


HISTORY = [{"role": "user", "content": "a"},
           {"role": "assistant", "content": "b", "reasoning_content": "r1"},
           {"role": "user", "content": "c"},
           {"role": "assistant", "content": "d", "reasoning_content": "r2"}]
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
ROWS: dict[str, list[Row]] = {
    "model": [Row("accounts/acct/models/m", where="routing: resolves the deployment"),
              Row("accounts/acct/models/m", where="routing", endpoints=EMBEDDINGS,
                  deployment=EMBED),
              Row("accounts/acct/models/m", refused=True, endpoints=EMBEDDINGS)],  # generates
    "stream": [Row(True, body={"stream": True, "stream_options": {
        "include_usage": True, "continuous_usage_stats": True}}, plan={"stream": True})],
    "max_tokens": [Row(7, body={"max_tokens": 7}, plan={"max_tokens": 7})],
    "max_completion_tokens": [Row(9, body={"max_tokens": 9}, plan={"max_tokens": 9})],
    "temperature": [Row(0.5, body={"temperature": 0.5})],
    "top_p": [Row(0.9, body={"top_p": 0.9})],
    "top_k": [Row(5, body={"top_k": 5})],
    "min_p": [Row(0.1, body={"min_p": 0.1})],
    "typical_p": [Row(0.5, options={"typical_p": 0.5, "ignored": ["typical_p"]})],
    "frequency_penalty": [Row(0.5, body={"frequency_penalty": 0.5})],
    "presence_penalty": [Row(0.5, body={"presence_penalty": 0.5})],
    "repetition_penalty": [Row(1.2, body={"vllm_xargs": {"repetition_penalty": 1.2}})],
    "mirostat_target": [Row(3.0, body={"vllm_xargs": {"mirostat_target": 3.0,
                                                      "mirostat_lr": 0.1}})],
    "mirostat_lr": [Row(0.3, options={"ignored": ["mirostat_lr"]})],  # without a target
    "seed": [Row(42, body={"seed": 42})],
    "n": [Row(3, body={"n": 3}, plan={"n": 3})],
    "stop": [Row(["x"], body={"stop": ["x"], "include_stop_str_in_output": True})],
    "logprobs": [Row(2, body={"logprobs": 2}, plan={"logprobs": "legacy"},
                     endpoints=("completions",)),
                 Row(True, body={"logprobs": True, "top_logprobs": 0},
                     plan={"logprobs": "content"}, endpoints=("chat",))],
    "top_logprobs": [Row(3, options={"ignored": ["top_logprobs"]})],  # without logprobs
    "echo": [Row(True, plan={"echo": True}, body={"return_token_ids": True})],
    "echo_last": [Row(2, plan={"echo": True, "echo_last": 2}, endpoints=("completions",)),
                  Row(2, refused=True, endpoints=("chat",))],
    "ignore_eos": [Row(True, body={"ignore_eos": True})],
    "context_length_exceeded_behavior": [
        Row("error", plan={"context_check": "max_completion_tokens"}),
        Row("truncate", where="the default: the worker lowers max_tokens to what fits")],
    "response_format": [Row({"type": "json_object"},
                            body={"response_format": {"type": "json_object"}},
                            endpoints=("chat",)),
                        Row({"type": "json_object"},
                            body={"structured_outputs": {"json_object": True}},
                            endpoints=("completions",))],
    "logit_bias": [Row({"5": 150.0}, body={"logit_bias": {"5": 100.0}})],
    "user": [Row("u1", body={"user": "u1"}),  # also the affinity key (see below)
             Row("u1", body={"user": "u1"}, endpoints=EMBEDDINGS, deployment=EMBED)],
    # embeddings only
    "input": [Row(["a", "b"], body={"input": ["a", "b"]}, endpoints=EMBEDDINGS,
                  deployment=EMBED),
              Row({"text": "T", "n": 2}, given={"prompt_template": "{text}!"},
                  body={"input": "T!"}, endpoints=EMBEDDINGS, deployment=EMBED),
              Row([{"text": "T"}, {"text": "U"}], given={"prompt_template": "# {text}"},
                  body={"input": ["# T", "# U"]}, endpoints=EMBEDDINGS, deployment=EMBED),
              Row({"title": "T"}, refused=True, endpoints=EMBEDDINGS, deployment=EMBED),
              Row([1, 2, 3], body={"input": [1, 2, 3]}, endpoints=EMBEDDINGS,
                  deployment=EMBED)],
    "dimensions": [Row(64, body={"dimensions": 64}, endpoints=EMBEDDINGS, deployment=EMBED)],
    "normalize": [Row(False, body={"use_activation": False}, endpoints=EMBEDDINGS,
                      deployment=EMBED),
                  Row(True, body={"use_activation": True}, endpoints=EMBEDDINGS,
                      deployment=EMBED),
                  Row("no", refused=True, endpoints=EMBEDDINGS, deployment=EMBED)],
    "prompt_template": [
        Row("Query: {text}", body={"input": "Query: hi"}, endpoints=EMBEDDINGS,
            deployment=EMBED),
        Row("{{ truncate_tokens(text) }}", refused=True, endpoints=EMBEDDINGS,
            deployment=EMBED),
        Row("{title}", refused=True, endpoints=EMBEDDINGS, deployment=EMBED),  # no field
        Row("{text}", given={"input": [1, 2]}, refused=True, endpoints=EMBEDDINGS,
            deployment=EMBED)],
    "return_logits": [Row([0, 1], refused=True, endpoints=EMBEDDINGS, deployment=EMBED)],
    "encoding_format": [Row("base64", body={"encoding_format": "base64"},
                            endpoints=EMBEDDINGS, deployment=EMBED)],
    "perf_metrics_in_response": [Row(True, plan={"perf_metrics_in_response": True}),
                                 Row(True, plan={"perf_metrics_in_response": True},
                                     endpoints=EMBEDDINGS, deployment=EMBED)],
    "raw_output": [Row(True, plan={"raw_output": True}, body={"return_token_ids": True})],
    "return_token_ids": [Row(True, plan={"return_token_ids": True},
                             body={"return_token_ids": True})],
    "prompt_cache_key": [Row("k1", where="routing: the affinity key (same replica, warm "
                                         "prefix cache)"),
                         Row("k1", where="routing: the affinity key", endpoints=EMBEDDINGS,
                             deployment=EMBED)],
    "prompt_cache_isolation_key": [
        Row("tenant-7", body={"cache_salt": account_salt("acct", "tenant-7")}),
        Row("tenant-7", body={"cache_salt": account_salt("acct", "tenant-7")},
            endpoints=EMBEDDINGS, deployment=EMBED)],
    "prompt_cache_max_len": [
        Row(0, body={"cache_salt": account_salt("acct", "n1")}),
        Row(100, refused=True)],
    "service_tier": [
        Row("priority", body={"priority": PRIORITY}, deployment=REASONING),
        Row("priority", absent=("priority",), options={"ignored": ["service_tier"]}),
        # An account the registry does not entitle: served as standard, the tier ignored.
        Row("priority", absent=("priority",), plan={"priority": False},
            options={"ignored": ["service_tier"]}, deployment=REASONING, entitled=False),
        Row("flex", where="standard service: only priority changes anything")],
    "reasoning_effort": [
        Row("high", body={"reasoning_effort": "high"}, deployment=REASONING,
            endpoints=("chat",)),
        Row(True, body={"reasoning_effort": "medium"}, deployment=REASONING,
            endpoints=("chat",)),
        Row(False, body={"reasoning_effort": "none"}, deployment=REASONING,
            endpoints=("chat",)),
        Row(512, body={"reasoning_effort": "medium", "thinking_token_budget": 512},
            deployment=REASONING, endpoints=("chat",)),
        Row("high", refused=True),  # no reasoning parser on the deployment
        Row("none", where="nothing to turn off: the deployment has no reasoning"),
        Row("high", refused=True, deployment=REASONING, endpoints=("completions",)),
        Row("max", refused=True)],
    "thinking": [
        Row({"type": "enabled", "budget_tokens": 2048},
            body={"reasoning_effort": "medium", "thinking_token_budget": 2048},
            deployment=REASONING, endpoints=("chat",)),
        Row({"type": "disabled"}, body={"reasoning_effort": "none"}, deployment=REASONING,
            absent=("thinking_token_budget",), endpoints=("chat",)),
        Row({"type": "enabled"}, refused=True)],
    "reasoning_history": [Row("interleaved", refused=True, endpoints=("completions",))],
    "speculation": [Row("a guess", refused=True)],
    "prediction": [Row({"type": "content", "content": "a guess"}, refused=True)],
    "metadata": [Row({"team": "search"}, plan={"metadata": {"team": "search"}})],
    "min_tokens": [Row(3, body={"min_tokens": 3})],
    "stream_options": [Row({"include_usage": False}, plan={"include_usage": False})],
    # chat only
    "messages": [Row([{"role": "developer", "content": "be brief"}],
                     body={"messages": [{"role": "system", "content": "be brief"}]},
                     endpoints=("chat",))],
    "tools": [Row(TOOLS, body={"tools": TOOLS}, endpoints=("chat",)),
              Row(TOOLS, refused=True, deployment=PLAIN.model_copy(
                  update={"tool_parser": None}), endpoints=("chat",)),
              Row([{"type": "function", "function": "f"}], refused=True,
                  given={"tool_choice": "required"}, endpoints=("chat",)),
              Row([{"type": "function", "function": {"name": 3}}], refused=True,
                  endpoints=("chat",))],
    "tool_choice": [Row("any", body={"tool_choice": "required"}, given={"tools": TOOLS},
                        endpoints=("chat",)),
                    Row({"type": "function", "function": {"name": "f"}},
                        body={"tools": [{"type": "function", "function": {
                            "name": "f", "parameters": {}, "strict": True}}]},
                        given={"tools": TOOLS}, endpoints=("chat",)),
                    Row("auto", refused=True, endpoints=("chat",)),
                    # malformed: a 400 naming the field, never a 500
                    Row({"type": "function", "function": "f"}, refused=True,
                        given={"tools": TOOLS}, endpoints=("chat",)),
                    Row({"type": "function", "function": {"name": ["f"]}}, refused=True,
                        given={"tools": TOOLS}, endpoints=("chat",))],
    "parallel_tool_calls": [Row(False, body={"parallel_tool_calls": False},
                                given={"tools": TOOLS}, endpoints=("chat",)),
                            Row(False, where="nothing to call without tools",
                                endpoints=("chat",))],
    "functions": [Row([{"name": "f", "parameters": {}}], body={"tools": TOOLS},
                      endpoints=("chat",))],
    "function_call": [Row({"name": "f"}, body={"tool_choice": {
                          "type": "function", "function": {"name": "f"}}},
                          given={"functions": [{"name": "f", "parameters": {}}]},
                          endpoints=("chat",)),
                      Row("auto", refused=True, endpoints=("chat",))],
    "prompt_truncate_len": [Row(100, refused=True, endpoints=("chat",))],
    "safe_tokenization": [Row(True, refused=True, endpoints=("chat",)),
                          Row(False, where="the default", endpoints=("chat",))],
    # completions only
    "prompt": [Row([1, 2, 3], body={"prompt": [1, 2, 3]}, endpoints=("completions",))],
    "images": [Row(["data:image/png;base64,AAAA"], refused=True,
                   endpoints=("completions",))],
}
# reasoning_history on chat has a table of its own below (it needs a history).
ROWS["reasoning_history"] += [Row("disabled", endpoints=("chat",),
                                  where="see test_reasoning_history")]


def translate(endpoint: str, extra: dict[str, Any], deployment: Deployment = PLAIN,
              entitled: bool = True) -> tuple[dict[str, Any], Plan]:
    """Through the endpoint's API object, then salted, as the data plane does."""
    api = APIS[endpoint]
    request = parse_body(orjson.dumps(BASES[endpoint] | extra), api.request_model, Settings())
    route = Route(deployment, request.model, priority_tier=entitled)
    call = api.translate(request, route, Settings(),
                         account="acct", nonce="n1")
    isolate(call, "acct", "n1")
    if isinstance(call, GenerationCall):
        return call.body, call.plan
    # embeddings have no Plan: what they carry besides the body, in one
    return call.body, Plan(chat=False, perf_metrics_in_response=call.perf_metrics_in_response)


def test_every_field_has_a_row() -> None:
    for endpoint, model in MODELS.items():
        fields = known_fields(model)
        rowed = {name for name, rows in ROWS.items()
                 if any(endpoint in row.endpoints for row in rows)}
        assert fields == rowed, (endpoint, fields ^ rowed)


CASES = [(name, i, endpoint) for name, rows in ROWS.items() for i, row in enumerate(rows)
         for endpoint in row.endpoints]


@pytest.mark.parametrize("name,index,endpoint", CASES,
                         ids=[f"{n}-{i}-{e}" for n, i, e in CASES])
def test_each_field_takes_effect_or_is_refused(name: str, index: int, endpoint: str) -> None:
    row = ROWS[name][index]
    if row.refused:
        with pytest.raises(GatewayError) as refused:
            translate(endpoint, row.given | {name: row.value}, row.deployment, row.entitled)
        assert refused.value.status == 400
        assert (refused.value.param or "").split(".")[0].split("[")[0] == name
        return
    body, plan = translate(endpoint, row.given | {name: row.value}, row.deployment,
                           row.entitled)
    for key, value in row.body.items():
        assert body.get(key) == value, (key, body.get(key))
    for key in row.absent:
        assert key not in body
    for key, value in row.plan.items():
        assert getattr(plan, key) == value, key
    for key, value in row.options.items():
        assert plan.sampling_options.get(key) == value, key
    base_body, base_plan = translate(endpoint, row.given, row.deployment, row.entitled)
    changed = body != base_body or plan != base_plan
    # Nothing accepted and dropped: a field changes the worker request, or says where it goes.
    assert changed or row.where, f"{name}={row.value!r} changed nothing"
    if row.where and name not in ("model",):
        assert not (row.body or row.plan), "a row says where, or what it changes"


def test_affinity_keys_route_and_do_not_reach_the_worker() -> None:
    for name in ("prompt_cache_key", "user"):
        request = CompletionRequest.model_validate(BASES["completions"] | {name: "k1"})
        call = CompletionsApi().translate(request, Route(PLAIN, "m"), Settings(),
                                          account="acct", nonce="n1")
        assert affinity_key({}, call) == "k1"
    body, _ = translate("completions", {"prompt_cache_key": "k1"})
    assert "prompt_cache_key" not in body


@pytest.mark.parametrize("mode,kept", [
    (None, ["r1", "r2"]), ("preserved", ["r1", "r2"]), ("interleaved", ["r2"]),
    ("disabled", []),
])
def test_reasoning_history(mode: str | None, kept: list[str]) -> None:
    extra: dict[str, Any] = {"messages": HISTORY}
    if mode:
        extra["reasoning_history"] = mode
    body, _ = translate("chat", extra)
    assert [m["reasoning_content"] for m in body["messages"] if "reasoning_content" in m] \
        == kept


def test_cache_salts_never_cross_accounts_and_zero_max_len_never_reuses() -> None:
    def salt(account: str, nonce: str = "n", **fields: Any) -> str:
        call = CompletionsApi().translate(CompletionRequest(model="m", prompt="x", **fields),
                                          Route(PLAIN, "m"), Settings(), account=account,
                                          nonce=nonce)
        isolate(call, account, nonce)
        return str(call.body["cache_salt"])

    assert salt("a") == salt("a") != salt("b")  # accounts never share cached prefixes
    assert salt("a", prompt_cache_isolation_key="t") != salt("a")
    assert salt("a", prompt_cache_isolation_key="t") != salt("b", prompt_cache_isolation_key="t")
    assert salt("a", "n1", prompt_cache_max_len=0) != salt("a", "n2", prompt_cache_max_len=0)
    assert len(salt("a")) == 32 and not set(salt("a")) & set("@/\\\0")  # what vLLM accepts


def test_prompt_templates_place_every_field_once_per_input() -> None:
    objects = [{"title": "T", "n": 2}, {"title": "U", "n": 3.5}]
    assert embedding_input(objects, "{title} ({n}); {title}", 1 << 20) == ["T (2); T", "U (3.5); U"]
    assert embedding_input("x", "{text}{text}", 1 << 20) == "xx"
    assert embedding_input(["a", "b"], None, 1 << 20) == ["a", "b"]  # no template: as given


SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


def tool(name: str, **function: Any) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": SCHEMA} | function}


@pytest.mark.parametrize("choice,strict", [
    ({"type": "function", "function": {"name": "g"}}, [None, True, False]),  # only the forced
    ("required", [True, True, False]),  # every tool may be the call; a client's False stays
    ("auto", [None, None, False]), (None, [None, None, False]), ("none", [None, None, False]),
])
def test_forced_calls_follow_the_tool_schema(choice: Any, strict: list[bool | None]) -> None:
    tools = [tool("f"), tool("g"), tool("h", strict=False)]
    sent = strict_when_forced(tools, choice)
    assert [t["function"].get("strict") for t in sent] == strict
    assert [t["function"].get("strict") for t in tools] == [None, None, False]  # not mutated
