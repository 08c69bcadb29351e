"""The documentation keeps up with the request models and the settings, and the README stays
the front door."""

from __future__ import annotations

import re

from gateway.anthropic.protocol import MessagesRequest
from gateway.config import Settings
from gateway.fireworks.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
)
from gateway.fireworks.rerank import RerankRequest
from gateway.fireworks.responses import ResponsesRequest
from gateway.validation import known_fields
from tests.conftest import ROOT


def test_every_request_field_is_documented() -> None:
    text = (ROOT / "docs" / "fireworks-api.md").read_text()
    named = set(re.findall(r"`([a-z_]+)`", text))
    for model in (ChatCompletionRequest, CompletionRequest, EmbeddingRequest,
                  ResponsesRequest, RerankRequest):
        assert known_fields(model) <= named, known_fields(model) - named


def test_every_setting_is_documented() -> None:
    text = (ROOT / "docs" / "operations.md").read_text()
    missing = [name for name in Settings.model_fields if f"GATEWAY_{name.upper()}" not in text]
    assert missing == []


def test_the_messages_fields_the_gateway_reads_are_documented() -> None:
    text = (ROOT / "docs" / "operations.md").read_text()
    assert all(f"`{name}`" in text or name == "model" for name in known_fields(MessagesRequest))


def test_readme_is_the_front_door() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    assert "make run" in readme and "make test" in readme
    for page in ("fireworks-api", "operations", "architecture", "benchmarks"):
        assert f"(docs/{page}.md)" in readme, page
        assert (ROOT / "docs" / f"{page}.md").exists(), page
