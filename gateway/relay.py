"""Relaying one request to a worker and its answer back, Fireworks style.

Non-streaming: the worker's JSON with the requested model echoed, usage kept, vLLM-only keys
dropped and fireworks-* performance headers added.
Streaming: headers are held until the first token (so a prefill failure still gets a real
status), usage moves onto the chunks that carry a finish_reason (or, when the client asked
with stream_options.include_usage, onto a trailing `choices: []` chunk), and the stream ends
with `data: [DONE]`. Closing the client connection closes the worker connection, which makes
vLLM abort the request.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
from fastapi.responses import Response, StreamingResponse

from gateway.errors import GatewayError, stream_error_event
from gateway.registry import Route
from gateway.routing import Lease
from gateway.upstream import WorkerClient

DONE = b"data: [DONE]\n\n"


@dataclass
class Call:
    """What the relay needs to know about one request."""

    route: Route
    lease: Lease
    request_id: str
    path: str  # worker path, e.g. /v1/chat/completions
    body: dict[str, Any]
    include_usage: bool | None = None  # the client's stream_options.include_usage
    perf_metrics_in_response: bool = False
    started: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None

    @property
    def url(self) -> str:
        return self.lease.replica.url.rstrip("/") + self.path

    def upstream_headers(self) -> dict[str, str]:
        return {"content-type": "application/json", "x-request-id": self.request_id}


def sampling_options(body: dict[str, Any]) -> dict[str, Any]:
    keys = ("temperature", "top_p", "top_k", "min_p", "frequency_penalty", "presence_penalty",
            "max_tokens", "seed", "n", "ignore_eos", "min_tokens")
    options = {key: body[key] for key in keys if key in body}
    options.update(body.get("vllm_xargs", {}))
    return options


def perf_metrics(call: Call, usage: dict[str, Any] | None,
                 engine: dict[str, Any] | None, complete: bool) -> dict[str, Any]:
    """Metrics known for this call, keyed like the fireworks-* headers without the prefix.
    Only measured values: token counts from the engine's usage, times from the engine's
    per-request metrics, else from the gateway's own clock."""
    metrics: dict[str, Any] = {}
    if usage is not None:
        metrics["prompt-tokens"] = usage.get("prompt_tokens", 0)
        details = usage.get("prompt_tokens_details") or {}
        metrics["cached-prompt-tokens"] = details.get("cached_tokens") or 0
    if engine and engine.get("time_to_first_token_ms") is not None:
        metrics["server-time-to-first-token"] = engine["time_to_first_token_ms"] / 1000.0
    elif call.first_token_at is not None:
        metrics["server-time-to-first-token"] = call.first_token_at - call.started
    if engine and engine.get("queue_time_ms") is not None:
        metrics["prefill-queue-duration"] = engine["queue_time_ms"] / 1000.0
    if complete:
        metrics["server-processing-time"] = time.monotonic() - call.started
        if engine and engine.get("generation_time_ms") is not None:
            metrics["generation-duration"] = engine["generation_time_ms"] / 1000.0
    metrics["deployment"] = call.route.deployment.name
    metrics["backend-host"] = urlsplit(call.lease.replica.url).netloc
    return metrics


def metric_headers(metrics: dict[str, Any], body: dict[str, Any]) -> dict[str, str]:
    headers = {f"fireworks-{key}": (f"{value:.6f}" if isinstance(value, float) else str(value))
               for key, value in metrics.items()}
    headers["fireworks-sampling-options"] = orjson.dumps(sampling_options(body)).decode()
    return headers


async def relay_json(client: WorkerClient, call: Call) -> Response:
    try:
        data, _ = await client.post_json(call.url, call.body, call.upstream_headers())
    finally:
        call.lease.release()
    engine = data.pop("metrics", None)
    data["model"] = call.route.requested_model
    metrics = perf_metrics(call, data.get("usage"), engine, complete=True)
    if call.perf_metrics_in_response:
        data["perf_metrics"] = metrics
    headers = metric_headers(metrics, call.body)
    return Response(orjson.dumps(data), media_type="application/json", headers=headers)


def _encode(chunk: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def _carries_token(chunk: dict[str, Any]) -> bool:
    for choice in chunk.get("choices") or []:
        delta = choice.get("delta") or {}
        if choice.get("text") or delta.get("content") or delta.get("tool_calls") \
                or delta.get("reasoning_content") or choice.get("finish_reason"):
            return True
    return False


class StreamReframer:
    """Turns the worker's chunks into Fireworks chunks (pure: no I/O, unit-testable)."""

    def __init__(self, call: Call) -> None:
        self.call = call
        self.held_finish: list[dict[str, Any]] = []

    def chunk(self, chunk: dict[str, Any]) -> list[bytes]:
        engine = chunk.pop("metrics", None)
        chunk["model"] = self.call.route.requested_model
        if not chunk.get("choices"):
            if chunk.get("usage") is not None:
                return self.finish(chunk["usage"], engine)
            return []
        if any(c.get("finish_reason") for c in chunk["choices"]):
            self.held_finish.append(chunk)  # usage is not known until the worker's last chunk
            return []
        chunk["usage"] = None
        return [_encode(chunk)]

    def finish(self, usage: dict[str, Any], engine: dict[str, Any] | None) -> list[bytes]:
        metrics = perf_metrics(self.call, usage, engine, complete=True)
        out: list[bytes] = []
        on_finish = usage if self.call.include_usage is None else None
        for chunk in self.held_finish:
            chunk["usage"] = on_finish
            if self.call.perf_metrics_in_response:
                chunk["perf_metrics"] = metrics
            out.append(_encode(chunk))
        self.held_finish = []
        if self.call.include_usage:
            template = {"id": "", "object": "", "created": 0}
            if out:
                template = orjson.loads(out[-1][len(b"data: "):])
            tail: dict[str, Any] = {
                "id": template["id"], "object": template["object"],
                "created": template["created"], "model": self.call.route.requested_model,
                "choices": [], "usage": usage,
            }
            if self.call.perf_metrics_in_response:
                tail["perf_metrics"] = metrics
            out.append(_encode(tail))
        return out


async def _events(response: httpx.Response) -> AsyncIterator[dict[str, Any] | None]:
    """The worker's SSE payloads as dicts; None for `[DONE]`."""
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            yield None
            return
        yield orjson.loads(payload)


async def relay_stream(client: WorkerClient, call: Call) -> Response:
    try:
        response = await client.open_stream(call.url, call.body, call.upstream_headers())
    except BaseException:
        call.lease.release()
        raise
    reframer = StreamReframer(call)
    events = _events(response)
    held: list[bytes] = []
    first_usage: dict[str, Any] | None = None
    try:
        # Hold the headers until the first token has been produced (or the stream ended).
        async for event in events:
            if event is None:
                break
            if _carries_token(event) or event.get("usage"):
                call.first_token_at = time.monotonic()
                first_usage = event.get("usage")
                held += reframer.chunk(event)
                break
            held += reframer.chunk(event)
    except BaseException:
        await response.aclose()
        call.lease.release()
        raise
    headers = metric_headers(perf_metrics(call, first_usage, None, complete=False), call.body)
    return StreamingResponse(_stream_body(call, response, events, reframer, held),
                             media_type="text/event-stream",
                             headers=headers | {"cache-control": "no-cache",
                                                "x-accel-buffering": "no"})


async def _stream_body(call: Call, response: httpx.Response,
                       events: AsyncIterator[dict[str, Any] | None],
                       reframer: StreamReframer, held: list[bytes]) -> AsyncIterator[bytes]:
    response_id = f"stream-{uuid.uuid4()}"
    try:
        for part in held:
            yield part
        async for event in events:
            if event is None:
                break
            response_id = event.get("id", response_id)
            for part in reframer.chunk(event):
                yield part
        yield DONE
    except (httpx.HTTPError, orjson.JSONDecodeError) as exc:
        yield stream_error_event(502, f"Upstream worker failed mid-stream: {exc!r}",
                                 response_id)
    except GatewayError as exc:
        yield stream_error_event(exc.status, exc.message, response_id)
    finally:
        # Runs on normal end and on client disconnect: closing the worker connection makes
        # vLLM abort the request, so no tokens are generated for nobody.
        await response.aclose()
        call.lease.release()
