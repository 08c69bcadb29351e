"""The engine plugins inside a real vLLM worker (SmolLM2, float32), through its HTTP API."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.e2e

PROMPTS = [
    "Once upon a time in a small village,",
    "The history of the Roman Empire",
    "Here is a recipe for bread:",
    "The best way to learn programming is",
    "In the year 2050, cities will",
    "My favourite animal is the cat because",
    "Scientists recently discovered that",
    "The weather today is",
]


async def complete_all(url: str, bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Send all requests at once, so the worker batches them together."""
    async with httpx.AsyncClient(timeout=600) as client:
        responses = await asyncio.gather(*[
            client.post(f"{url}/v1/completions", json=body) for body in bodies])
    for response in responses:
        assert response.status_code == 200, response.text
    return [response.json() for response in responses]


def token_ids(response: dict[str, Any]) -> list[int]:
    return list(response["choices"][0]["token_ids"])


def test_repetition_penalty_processor_equals_native(smollm2_worker: str) -> None:
    """0.8 and 1.3, greedy and sampled, native field vs processor, all in one mixed batch
    whose requests finish at different times: the very same tokens."""
    bodies, pairs = [], []
    for k, (penalty, temperature) in enumerate([(0.8, 0.0), (1.3, 0.0), (0.8, 1.0),
                                                (1.3, 1.0)]):
        common = {"prompt": PROMPTS[k], "temperature": temperature, "seed": 100 + k,
                  "max_tokens": 24 + 12 * k, "ignore_eos": True, "return_token_ids": True}
        pairs.append((len(bodies), len(bodies) + 1))
        bodies.append(common | {"repetition_penalty": penalty})
        bodies.append(common | {"vllm_xargs": {"repetition_penalty": penalty}})
    bodies.append({"prompt": PROMPTS[5], "temperature": 0.0, "max_tokens": 40,
                   "return_token_ids": True})  # a row without any penalty
    results = asyncio.run(complete_all(smollm2_worker, bodies))
    plain = token_ids(results[-1])
    for native, processor in pairs:
        assert token_ids(results[native]) == token_ids(results[processor])
        assert len(token_ids(results[native])) == bodies[native]["max_tokens"]
    # The penalty did something: penalised greedy output differs from unpenalised.
    unpenalised = asyncio.run(complete_all(smollm2_worker, [
        {"prompt": PROMPTS[1], "temperature": 0.0, "max_tokens": 36, "ignore_eos": True,
         "return_token_ids": True}]))[0]
    assert token_ids(unpenalised) != token_ids(results[pairs[1][0]])
    assert plain


def test_bad_mirostat_target_is_400_naming_it(smollm2_worker: str) -> None:
    for bad in ("abc", -1, float("inf"), None):
        xargs: dict[str, Any] = {"mirostat_target": bad} if bad is not None else \
            {"mirostat_lr": 0.1}
        body = {"prompt": "Hi", "max_tokens": 2, "vllm_xargs": xargs}
        if bad == float("inf"):
            content = httpx.post(f"{smollm2_worker}/v1/completions",
                                 content=b'{"prompt":"Hi","max_tokens":2,'
                                         b'"vllm_xargs":{"mirostat_target":1e999}}',
                                 headers={"content-type": "application/json"})
            response = content
        else:
            response = httpx.post(f"{smollm2_worker}/v1/completions", json=body)
        assert response.status_code == 400, (bad, response.text)
        error = response.json()["error"]
        assert "mirostat" in error["message"]
        assert error["param"].startswith("vllm_xargs.mirostat")
    greedy = httpx.post(f"{smollm2_worker}/v1/completions", json={
        "prompt": "Hi", "max_tokens": 2, "temperature": 0,
        "vllm_xargs": {"mirostat_target": 3}})
    assert greedy.status_code == 400 and greedy.json()["error"]["param"] == "temperature"


def test_without_mirostat_output_equals_stock_vllm(smollm2_worker: str,
                                                   stock_worker: str) -> None:
    bodies = [{"prompt": p, "temperature": t, "seed": 7, "max_tokens": 32,
               "return_token_ids": True, "ignore_eos": True}
              for p in PROMPTS[:3] for t in (0.0, 0.9)]
    with_plugins = asyncio.run(complete_all(smollm2_worker, bodies))
    stock = asyncio.run(complete_all(stock_worker, bodies))
    assert [token_ids(r) for r in with_plugins] == [token_ids(r) for r in stock]
