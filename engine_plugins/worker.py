"""The worker launcher: vLLM's OpenAI server with this project's logits processors loaded.

    python -m engine_plugins.worker --model DIR_OR_HF_ID --port 8001 [any vLLM flag ...]

Everything it does not recognise is passed to vLLM unchanged, so any model and any flag vLLM
accepts works (a GPU user points it at a real model and adds --tensor-parallel-size etc.).

Why the processors go through --logits-processors rather than the entry point: vLLM 0.32's
V1 runner only tracks output token ids for processors given on the command line.
Why the V1 model runner: the plugins' Model Runner V2 path has only been unit-tested so far,
so when plugins are loaded the launcher pins VLLM_USE_V2_MODEL_RUNNER=0 (CPU builds use V1
anyway). Set it yourself to override.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from engine_plugins.lora_rows import DISABLE_ENV as DISABLE_CORRECTIONS
from engine_plugins.worker_auth import KEY_ENV, read_key

# Registered in this order; each class serves both model runners (engine_plugins/plugins.py).
PROCESSORS = [
    "engine_plugins.plugins:RepetitionPenalty",
    "engine_plugins.plugins:Mirostat",
]

# Engine-side numbers the gateway turns into fireworks-* headers (per-request timings and
# cached prompt tokens).
METRICS_FLAGS = ["--enable-per-request-metrics", "--enable-prompt-tokens-details"]


def _has_flag(argv: Sequence[str], flag: str) -> bool:
    return any(arg == flag or arg.startswith(flag + "=") for arg in argv)


def kv_events_config(port: int) -> str:
    """vLLM's --kv-events-config: KV-cache events published on `port` (ZMQ PUB), replayed
    on request on `port` + 1 (the gateway's subscriptions: gateway/dataplane/kv_events.py)."""
    return json.dumps({"enable_kv_cache_events": True, "publisher": "zmq",
                       "endpoint": f"tcp://*:{port}", "replay_endpoint": f"tcp://*:{port + 1}"})


def build_command(
    model: str, port: int, host: str, plugins: bool, passthrough: Sequence[str],
    kv_events_port: int | None = None, api_key_file: str | None = None,
) -> list[str]:
    """The vLLM server command line (without the interpreter)."""
    command = ["-m", "vllm.entrypoints.openai.api_server", "--model", model,
               "--host", host, "--port", str(port)]
    if api_key_file is not None:  # every path but the probes needs the key (worker_auth.py)
        command += ["--middleware", "engine_plugins.worker_auth.RequireKey"]
    if kv_events_port is not None:
        command += ["--kv-events-config", kv_events_config(kv_events_port)]
    if plugins and not _has_flag(passthrough, "--logits-processors"):
        command += ["--logits-processors", *PROCESSORS]
    command += [flag for flag in METRICS_FLAGS if not _has_flag(passthrough, flag)]
    command += list(passthrough)
    return command


def build_environment(plugins: bool, base: dict[str, str],
                      passthrough: Sequence[str] = (),
                      api_key_file: str | None = None) -> dict[str, str]:
    env = dict(base)
    if api_key_file is not None:
        read_key(api_key_file)  # a missing or empty key file stops the launch here
        env[KEY_ENV] = api_key_file
    if plugins:
        env.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    else:  # stock vLLM: not even the corrections (engine_plugins/lora_rows.py)
        env[DISABLE_CORRECTIONS] = "off"
    if _has_flag(passthrough, "--enable-lora"):
        # The gateway loads and unloads adapters at run time (/v1/load_lora_adapter).
        env.setdefault("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")
    return env


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m engine_plugins.worker",
        description="Start a vLLM OpenAI server with the Fireworks sampling processors.",
    )
    parser.add_argument("--model", required=True, help="model directory or Hugging Face id")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--no-plugins", action="store_true",
                        help="start stock vLLM without the project's processors")
    parser.add_argument("--kv-events-port", type=int,
                        help="publish KV-cache events on this port (replay on the next one) "
                             "for the gateway's cache-aware routing")
    parser.add_argument("--api-key-file",
                        help="a file holding the workers' key: every request but the probes "
                             "and /metrics must carry it (Authorization: Bearer)")
    return parser.parse_known_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args, passthrough = parse_args(sys.argv[1:] if argv is None else argv)
    plugins = not args.no_plugins
    command = build_command(args.model, args.port, args.host, plugins, passthrough,
                            args.kv_events_port, args.api_key_file)
    env = build_environment(plugins, dict(os.environ), passthrough, args.api_key_file)
    # exec keeps one process: signals from the supervisor reach vLLM directly.
    os.execve(sys.executable, [sys.executable, *command], env)


if __name__ == "__main__":
    main()
