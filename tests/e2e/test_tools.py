"""Forced tool calls follow the tool's schema, on the real worker with the hermes tool
parser: what LangChain's `with_structured_output` relies on. vLLM 0.32 constrains a forced
call's arguments only for tools that say `strict: true`; the gateway sets it for forced
calls, as Fireworks constrains them."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import Stack

pytestmark = pytest.mark.e2e
MODEL = "accounts/fireworks/models/smollm2-tools"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather forecast for a city.",
    "parameters": {"type": "object", "additionalProperties": False,
                   "required": ["city", "days"],
                   "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]},
                                  "days": {"type": "integer"}}}}}
FORCED = {"type": "function", "function": {"name": "get_weather"}}
QUESTIONS = ["What will the weather be in Paris for the next 3 days?",
             "Is it going to rain in Rome this week?",
             "Tell me a joke about cats.",
             "Weather, please."]


def follows_schema(arguments: str) -> bool:
    try:
        args = json.loads(arguments)
    except json.JSONDecodeError:
        return False
    return isinstance(args, dict) and set(args) == {"city", "days"} \
        and args["city"] in ("Paris", "Rome") and type(args["days"]) is int


def forced_call(url: str, headers: dict[str, str], model: str, question: str) -> str:
    answer = httpx.post(url, headers=headers, timeout=120, json={
        "model": model, "messages": [{"role": "user", "content": question}],
        "tools": [WEATHER], "tool_choice": FORCED, "temperature": 0, "max_tokens": 150})
    assert answer.status_code == 200, answer.text
    (call,) = answer.json()["choices"][0]["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    return str(call["function"]["arguments"])


def test_forced_calls_follow_the_schema(stack: Stack) -> None:
    through = [forced_call(f"{stack.base_url}/inference/v1/chat/completions",
                           stack.headers, MODEL, q) for q in QUESTIONS]
    assert all(follows_schema(a) for a in through), through
    # The same requests straight to the worker, as a client of stock vLLM sends them.
    direct = [forced_call(f"{stack.worker_url}/v1/chat/completions", {}, "smollm2", q)
              for q in QUESTIONS]
    assert not all(follows_schema(a) for a in direct), \
        "vLLM now constrains forced calls itself: the gateway's strict may go"


def test_an_automatic_choice_is_left_to_the_model(stack: Stack) -> None:
    answer: Any = httpx.post(f"{stack.base_url}/inference/v1/chat/completions",
                             headers=stack.headers, timeout=120, json={
                                 "model": MODEL, "tools": [WEATHER], "temperature": 0,
                                 "max_tokens": 20,
                                 "messages": [{"role": "user", "content": QUESTIONS[0]}]})
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["finish_reason"] in ("stop", "length", "tool_calls")
