"""The documentation keeps up with the request models."""

from __future__ import annotations

import re

from gateway.fireworks.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
)
from gateway.validation import known_fields
from tests.conftest import ROOT


def test_every_request_field_is_documented() -> None:
    text = (ROOT / "docs" / "fireworks-api.md").read_text()
    named = set(re.findall(r"`([a-z_]+)`", text))
    for model in (ChatCompletionRequest, CompletionRequest, EmbeddingRequest):
        assert known_fields(model) <= named, known_fields(model) - named
