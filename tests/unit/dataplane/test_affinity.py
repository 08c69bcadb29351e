"""Affinity keys: named by the client, or derived from the prompt's stable head."""

from __future__ import annotations

from typing import Any

from gateway.api import Call
from gateway.config import Settings
from gateway.controlplane.registry import Deployment, Route
from gateway.dataplane.affinity import affinity_key, prefix_key
from gateway.fireworks.chat import ChatApi
from gateway.fireworks.completions import CompletionsApi
from gateway.fireworks.protocol import ChatCompletionRequest, CompletionRequest

SYSTEM = {"role": "system", "content": "You are a support agent for ACME. " * 20}


def chat(*messages: dict[str, Any], **fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "m", "messages": list(messages)} | fields)


def call(request: ChatCompletionRequest | CompletionRequest) -> Call:
    """The request translated by its API, as the data plane does."""
    api = ChatApi() if isinstance(request, ChatCompletionRequest) else CompletionsApi()
    route = Route(Deployment(id="d", account="a", model="m", tool_parser="hermes"), "m")
    return api.translate(request, route, Settings(), account="a", nonce="n")  # type: ignore[arg-type]


def key(request: ChatCompletionRequest | CompletionRequest, limit: int = 4096) -> str:
    """The key derived from the request's head, as its API defines the head."""
    material = call(request).prefix_material(limit)
    assert material is not None
    return prefix_key(material)


def test_every_turn_of_a_conversation_has_the_same_key() -> None:
    first = chat(SYSTEM, {"role": "user", "content": "My order is late"})
    later = chat(SYSTEM, {"role": "user", "content": "My order is late"},
                 {"role": "assistant", "content": "Sorry!"},
                 {"role": "user", "content": "When will it come?"})
    assert key(first) == key(later)


def test_other_conversations_tools_or_system_prompts_have_other_keys() -> None:
    base = chat(SYSTEM, {"role": "user", "content": "My order is late"})
    assert key(base) != key(chat(SYSTEM, {"role": "user", "content": "Refund, please"}))
    assert key(base) != key(chat({"role": "system", "content": "Other"},
                                 {"role": "user", "content": "My order is late"}))
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    assert key(base) != key(chat(SYSTEM, {"role": "user", "content": "My order is late"},
                                 tools=tools))


def test_a_forced_tool_keeps_the_conversations_key() -> None:
    """The head is the tools as the client sent them, not as the worker gets them (a forced
    call's tools go out with `strict`): forcing a tool on one turn keeps the key."""
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    forced = chat(SYSTEM, {"role": "user", "content": "hi"}, tools=tools,
                  tool_choice="required")
    auto = chat(SYSTEM, {"role": "user", "content": "hi"}, tools=tools, tool_choice="auto")
    assert call(forced).body["tools"] != call(auto).body["tools"]  # strict on the forced one
    assert key(forced) == key(auto)


def test_only_the_first_bytes_count() -> None:
    one = CompletionRequest(model="m", prompt="shared head " * 100 + "one")
    two = CompletionRequest(model="m", prompt="shared head " * 100 + "two")
    assert key(one, 1000) == key(two, 1000) and key(one, 4096) != key(two, 4096)
    ids = CompletionRequest(model="m", prompt=[[1, 2, 3], [4]])
    assert key(ids) == key(CompletionRequest(model="m", prompt=[1, 2, 3]))


def test_a_named_key_wins_and_zero_bytes_derives_none() -> None:
    request = chat(SYSTEM, {"role": "user", "content": "hi"}, user="u1")
    assert affinity_key({}, call(request), 4096) == "u1"
    assert affinity_key({"x-session-affinity": "s"}, call(request), 4096) == "s"
    unnamed = chat(SYSTEM, {"role": "user", "content": "hi"})
    assert affinity_key({}, call(unnamed), 0) is None
    assert affinity_key({}, call(unnamed), 4096) == key(unnamed)


def test_the_multi_turn_session_header_wins() -> None:
    request = chat(SYSTEM, {"role": "user", "content": "hi"}, user="u1")
    both = {"x-session-affinity": "s", "x-multi-turn-session-id": "turns-1"}
    assert affinity_key(both, call(request), 4096) == "turns-1"
    assert affinity_key({"x-multi-turn-session-id": "t"}, call(request), 0) == "t"
    assert affinity_key({"x-multi-turn-session-id": ""}, call(request), 0) == "u1"
