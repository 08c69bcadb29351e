"""LangChain's standard integration tests for `ChatFireworks` (langchain-tests), pointed at
the gateway in front of the real SmolLM2 worker with the hermes tool parser. The tests that
fail only because a 135M-parameter model cannot do what they ask (recall facts, pick the
right tool unprompted, follow a multi-turn tool conversation) are listed in MODEL_SIZE with
the reason, and marked as expected failures (strict: one that starts passing fails the run,
so the list stays true)."""

from __future__ import annotations

from typing import Any

import pytest
from langchain_core.language_models import BaseChatModel
from langchain_fireworks import ChatFireworks
from langchain_tests.integration_tests import ChatModelIntegrationTests

from tests.e2e.conftest import Stack

pytestmark = pytest.mark.e2e
MODEL = "accounts/fireworks/models/smollm2-tools"
# Run with `make test-langchain` (LANGCHAIN_STANDARD=1): not part of `make test`, whose
# result must not depend on what a 135M model decodes in a shared CPU batch. Measured: the
# same tests pass in one run and fail in the next (test_bind_runnables_as_tools,
# test_structured_output_async[typeddict], test_tool_calling), and the suite takes ~20 min.
OPT_IN = "LANGCHAIN_STANDARD"
# What the suite asks of a model this deployment does not serve (not collected: see
# tests/e2e/conftest.py): SmolLM2-135M-Instruct reads text only, and no cassettes are kept.
NOT_APPLICABLE = {
    "test_pdf_inputs": "text only", "test_audio_inputs": "text only",
    "test_image_inputs": "text only", "test_image_tool_message": "text only",
    "test_pdf_tool_message": "text only", "test_anthropic_inputs": "no Anthropic blocks",
    "test_stream_time": "VCR cassettes are not kept",
    # ChatFireworks 1.7.1 sends the model it was built with, whatever `model=` a call passes
    # (measured: the answers name the built one), so there is no override to test here.
    "test_invoke_with_model_override": "client", "test_ainvoke_with_model_override": "client",
    "test_stream_with_model_override": "client", "test_astream_with_model_override": "client",
}
# test -> (why SmolLM2-135M fails it, strict). The gateway's part of each is checked by
# the suite's other tests and by tests/e2e/test_tools.py. Strict ones failed in every run
# and fail the run if they start passing; the others failed in some runs and passed in
# others (greedy decoding in a shared CPU batch is not bit-stable).
MODEL_SIZE: dict[str, tuple[str, bool]] = {
    "test_agent_loop": ("with a free choice the model answers instead of calling the tool",
                        True),
    "test_json_mode": ("in JSON mode the model nests keys instead of writing a joke", False),
    "test_tool_calling": ("the forced call follows the schema, but the model often passes "
                          "a wrong value (e.g. -107 for 3)", False),
    "test_tool_calling_async": ("as test_tool_calling", False),
    "test_structured_output[json_schema]": ("the model may pad its forced call with "
                                            "whitespace past max_tokens", False),
    "test_structured_output_optional_param": ("the model may leave the forced call "
                                              "unfinished", False),
    "test_unicode_tool_call_integration": ("the model does not copy the Chinese text into "
                                           "the call's arguments", False),
}


class TestChatFireworksThroughTheGateway(ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[BaseChatModel]:
        return ChatFireworks

    @property
    def chat_model_params(self) -> dict[str, Any]:
        # Greedy, as the suite's own unit tests are (its integration base class sets no
        # sampling): with Fireworks' defaults (temperature 1, max_tokens 2048) a 135M model
        # samples a different answer each run and sometimes rambles to the context's end.
        return {"model": MODEL, "temperature": 0, "max_tokens": 200}

    @property
    def has_tool_choice(self) -> bool:
        return True

    @property
    def supports_json_mode(self) -> bool:
        return True

    @property
    def returns_usage_metadata(self) -> bool:
        return True

    @pytest.fixture(autouse=True)
    def _gateway(self, stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
        """Models the suite builds itself (not through `model`) find the gateway too."""
        monkeypatch.setenv("FIREWORKS_API_BASE", stack.base_url)
        monkeypatch.setenv("FIREWORKS_API_KEY", stack.api_key)

    @pytest.fixture
    def model(self, request: Any, stack: Stack) -> BaseChatModel:
        extra = getattr(request, "param", None) or {}
        return ChatFireworks(**{**self.standard_chat_model_params, **self.chat_model_params,
                                "base_url": stack.base_url, "api_key": stack.api_key,
                                **extra})
