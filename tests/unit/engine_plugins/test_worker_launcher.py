from __future__ import annotations

from engine_plugins.worker import PROCESSORS, build_command, build_environment, parse_args


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
