"""Fireworks performance metrics: the `fireworks-*` response headers and `perf_metrics`.

Only measured values: token counts from the engine's usage, times from the engine's
per-request metrics, else from the gateway's own clock. Pure: the caller says what it knows.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from gateway.api import Served


def perf_metrics(served: Served, usage: dict[str, Any] | None,
                 engine: dict[str, Any] | None, complete: bool) -> dict[str, Any]:
    """Metrics known for this request, keyed like the fireworks-* headers less the prefix.
    `usage` is already coerced (worker_answer.coerce_usage)."""
    metrics: dict[str, Any] = {}
    if usage is not None:
        metrics["prompt-tokens"] = usage["prompt_tokens"]
        metrics["cached-prompt-tokens"] = usage["prompt_tokens_details"]["cached_tokens"]
    engine = engine if isinstance(engine, dict) else {}
    ttft = _seconds(engine.get("time_to_first_token_ms"))
    if ttft is not None:
        metrics["server-time-to-first-token"] = ttft
    elif served.first_token_at is not None:
        metrics["server-time-to-first-token"] = served.first_token_at - served.started
    queue = _seconds(engine.get("queue_time_ms"))
    if queue is not None:
        metrics["prefill-queue-duration"] = queue
    if complete:
        metrics["server-processing-time"] = time.monotonic() - served.started
        generation = _seconds(engine.get("generation_time_ms"))
        if generation is not None:
            metrics["generation-duration"] = generation
    metrics["deployment"] = served.deployment
    metrics["backend-host"] = served.backend_host
    metrics["num-concurrent-requests"] = served.concurrent
    if served.routing is not None:
        metrics["routing"] = served.routing
    return metrics


def _seconds(milliseconds: Any) -> float | None:
    if isinstance(milliseconds, (int, float)) and not isinstance(milliseconds, bool):
        return milliseconds / 1000.0
    return None


def fireworks_headers(metrics: dict[str, Any]) -> list[tuple[bytes, bytes]]:
    """The metrics as `fireworks-*` headers, as they are sent (values outside latin-1
    replaced). Formatted straight to bytes: a dozen of these per request."""
    headers = []
    for key, value in metrics.items():
        if key == "deployment":  # a header of every API's reply (dataplane/targets.py)
            continue
        name = _HEADER_NAMES.get(key)
        if name is None:  # (the keys are perf_metrics' few)
            name = _HEADER_NAMES[key] = b"fireworks-" + key.encode()
        kind = type(value)
        if kind is float:
            headers.append((name, b"%.6f" % value))
        elif kind is int:
            headers.append((name, b"%d" % value))
        else:
            headers.append((name, str(value).encode("latin-1", "replace")))
    return headers


_HEADER_NAMES: dict[str, bytes] = {}


def metric_headers(metrics: dict[str, Any], sampling_options: dict[str, Any],
                   context_length: int | None) -> list[tuple[bytes, bytes]]:
    headers = fireworks_headers(metrics)
    options = dict(sampling_options)
    if context_length and "prompt-tokens" in metrics:  # what truncate mode really allowed
        options["max_tokens"] = min(options["max_tokens"],
                                    max(context_length - metrics["prompt-tokens"], 0))
    # (orjson writes UTF-8; a header value goes out in latin-1, the rest replaced)
    headers.append((b"fireworks-sampling-options",
                    orjson.dumps(options).decode().encode("latin-1", "replace")))
    return headers
