"""Prompt-cache isolation on the real worker: vLLM's prefix cache, salted per account, per
isolation key, or per request (prompt_cache_max_len 0)."""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import MODEL, OTHER_KEY, Stack

pytestmark = pytest.mark.e2e


def cached(stack: Stack, prompt: str, key: str | None = None, model: str = MODEL,
           **fields: Any) -> int:
    """The cached prompt tokens of one request."""
    response = httpx.post(f"{stack.base_url}/inference/v1/completions", timeout=120,
                          headers={"Authorization": f"Bearer {key or stack.api_key}"},
                          json={"model": model, "prompt": prompt, "max_tokens": 1,
                                "temperature": 0} | fields)
    assert response.status_code == 200, response.text
    return int(response.json()["usage"]["prompt_tokens_details"]["cached_tokens"])


def shared_prefix() -> str:
    # Long enough for several cache blocks; new in each test, so earlier tests do not warm it.
    return f"{uuid.uuid4().hex} " + "The quick brown fox jumps over the lazy dog. " * 12


def test_an_account_reuses_its_own_cached_prefix_and_no_one_elses(stack: Stack) -> None:
    prompt = shared_prefix()
    assert cached(stack, prompt) == 0
    assert cached(stack, prompt) > 0  # the same account: the prefix cache works
    # Another account, the same prompt on the same worker: nothing reused.
    assert cached(stack, prompt, OTHER_KEY, "accounts/other/models/private") == 0


def test_isolation_keys_split_an_account(stack: Stack) -> None:
    prompt = shared_prefix()
    assert cached(stack, prompt) == 0
    assert cached(stack, prompt, prompt_cache_isolation_key="tenant-1") == 0
    assert cached(stack, prompt, prompt_cache_isolation_key="tenant-1") > 0
    assert cached(stack, prompt, prompt_cache_isolation_key="tenant-2") == 0


def test_max_len_zero_reuses_nothing(stack: Stack) -> None:
    prompt = shared_prefix()
    assert cached(stack, prompt) == 0
    assert cached(stack, prompt, prompt_cache_max_len=0) == 0
    assert cached(stack, prompt, prompt_cache_max_len=0) == 0


def test_priority_is_reported_ignored_without_a_priority_scheduler(stack: Stack) -> None:
    response = httpx.post(f"{stack.base_url}/inference/v1/chat/completions", timeout=120,
                          headers=stack.headers,
                          json={"model": MODEL, "max_tokens": 2, "service_tier": "priority",
                                "metadata": {"team": "search"},
                                "messages": [{"role": "user", "content": "Hi"}]})
    assert response.status_code == 200, response.text
    options = json.loads(response.headers["fireworks-sampling-options"])
    assert options["ignored"] == ["service_tier"]


def messages_cached(stack: Stack, text: str, key: str | None = None,
                    model: str = MODEL) -> int:
    """The prompt tokens one Messages request read from the worker's prefix cache."""
    response = httpx.post(f"{stack.base_url}/inference/v1/messages", timeout=120,
                          headers={"x-api-key": key or stack.api_key},
                          json={"model": model, "max_tokens": 1, "temperature": 0,
                                "messages": [{"role": "user", "content": text}]})
    assert response.status_code == 200, response.text
    return int(response.json()["usage"].get("cache_read_input_tokens") or 0)


def test_messages_requests_are_isolated_like_every_other_api(stack: Stack) -> None:
    text = shared_prefix()
    assert messages_cached(stack, text) == 0
    assert messages_cached(stack, text) > 0  # the account's own cache works
    assert messages_cached(stack, text, OTHER_KEY, "accounts/other/models/private") == 0
