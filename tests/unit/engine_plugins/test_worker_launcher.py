from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from engine_plugins.worker import PROCESSORS, build_command, build_environment, parse_args
from engine_plugins.worker_auth import KEY_ENV, RequireKey


def test_plugins_are_registered_on_the_command_line() -> None:
    args, rest = parse_args(["--model", "m", "--port", "9", "--dtype", "float32"])
    command = build_command(args.model, args.port, args.host, True, rest)
    at = command.index("--logits-processors")
    assert command[at + 1: at + 1 + len(PROCESSORS)] == PROCESSORS
    assert command[-2:] == ["--dtype", "float32"]  # other vLLM flags pass through
    assert "--enable-per-request-metrics" in command


def test_no_plugins_means_stock_vllm() -> None:
    command = build_command("m", 9, "127.0.0.1", False, [])
    assert "--logits-processors" not in command
    assert "VLLM_USE_V2_MODEL_RUNNER" not in build_environment(False, {})
    # stock vLLM has no corrections either (engine_plugins/lora_rows.py)
    assert build_environment(False, {})["ENGINE_PLUGINS_CORRECTIONS"] == "off"
    assert "ENGINE_PLUGINS_CORRECTIONS" not in build_environment(True, {})


def test_v1_runner_is_pinned_with_plugins_unless_overridden() -> None:
    assert build_environment(True, {})["VLLM_USE_V2_MODEL_RUNNER"] == "0"
    assert build_environment(True, {"VLLM_USE_V2_MODEL_RUNNER": "1"})[
        "VLLM_USE_V2_MODEL_RUNNER"] == "1"


def test_user_flags_are_not_duplicated() -> None:
    command = build_command("m", 9, "h", True, ["--enable-per-request-metrics",
                                                "--logits-processors", "x:Y"])
    assert command.count("--enable-per-request-metrics") == 1
    assert command.count("--logits-processors") == 1


def test_lora_workers_take_adapters_at_run_time() -> None:
    env = build_environment(True, {}, ["--enable-lora", "--max-loras", "2"])
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in build_environment(True, {}, [])


def test_a_worker_with_a_key_file_guards_every_path_but_the_probes(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("s3cret\n")
    command = build_command("m", 9, "127.0.0.1", True, [], api_key_file=str(key_file))
    assert command[command.index("--middleware") + 1] == "engine_plugins.worker_auth.RequireKey"
    env = build_environment(True, {}, api_key_file=str(key_file))
    assert env[KEY_ENV] == str(key_file)
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError):
        build_environment(True, {}, api_key_file=str(tmp_path / "empty"))

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    guarded = RequireKey(app, key=b"s3cret")

    def status(path: str, key: str | None) -> int:
        headers = [] if key is None else [(b"authorization", b"Bearer " + key.encode())]
        sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        asyncio.run(guarded({"type": "http", "path": path, "headers": headers}, None, send))
        return int(sent[0]["status"])

    # vLLM's own --api-key leaves /tokenize, /detokenize, /rerank and /score open.
    for path in ("/v1/completions", "/tokenize", "/detokenize", "/rerank", "/score",
                 "/v1/load_lora_adapter", "/pooling"):
        assert status(path, None) == 401, path
        assert status(path, "wrong") == 401, path
        assert status(path, "s3cret") == 200, path
    for path in ("/health", "/metrics", "/ping"):
        assert status(path, None) == 200, path
