"""The serve command's process count: several processes only with shared state."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from gateway.cli import app


def test_several_processes_without_redis_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GATEWAY_REDIS_URL", raising=False)
    monkeypatch.setenv("GATEWAY_WORKERS", "1")  # restored after serve() sets it
    result = CliRunner().invoke(app, ["serve", "--workers", "2"])
    assert result.exit_code == 2
    assert "GATEWAY_REDIS_URL" in result.output
