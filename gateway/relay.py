"""Relaying one request to a worker and its answer back, Fireworks style.

Non-streaming: the worker's JSON reshaped (responses.py) with fireworks-* headers.
Streaming: headers are held until the first token (so a prefill failure still gets a real
status), usage moves onto the chunks that carry a finish_reason (or, when the client asked
with stream_options.include_usage, onto a trailing `choices: []` chunk), and the stream ends
with `data: [DONE]`. Closing the client connection closes the worker connection, which makes
vLLM abort the request.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
from fastapi.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from gateway.errors import GatewayError, stream_error_event
from gateway.registry import Route
from gateway.responses import ChoiceState, reject_chat_abort, shape_choice, token_ids_in
from gateway.routing import Lease
from gateway.tokens import TokenTexts
from gateway.translate import Plan
from gateway.upstream import WorkerClient

DONE = b"data: [DONE]\n\n"
# How a request ended: "ok", "error" or "aborted" (the client went away), its HTTP status,
# and the usage known at that point.
EndHook = Callable[["Call", str, int, "dict[str, Any] | None"], None]


def _no_hook(call: Call, status: str, http_status: int, usage: dict[str, Any] | None) -> None:
    return None


@dataclass
class Call:
    """What the relay needs to know about one request."""

    route: Route
    lease: Lease
    request_id: str
    path: str  # worker path, e.g. /v1/chat/completions
    body: dict[str, Any]
    plan: Plan
    include_usage: bool | None = None  # the client's stream_options.include_usage
    perf_metrics_in_response: bool = False
    prompt_fragments: list[Any] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    on_end: EndHook = _no_hook
    ended: bool = False

    def end(self, status: str, http_status: int, usage: dict[str, Any] | None) -> None:
        """Exactly once per request: release the replica, then account for the request."""
        if self.ended:
            return
        self.ended = True
        self.lease.release()
        self.on_end(self, status, http_status, usage)

    @property
    def worker_url(self) -> str:
        return self.lease.replica.url.rstrip("/")

    def upstream_headers(self) -> dict[str, str]:
        return {"x-request-id": self.request_id}


def usage_of(usage: dict[str, Any] | None) -> dict[str, Any] | None:
    if usage is None:
        return None
    details = usage.get("prompt_tokens_details") or {}
    return {"prompt_tokens": usage.get("prompt_tokens", 0),
            "completion_tokens": usage.get("completion_tokens", 0),
            "total_tokens": usage.get("total_tokens", 0),
            "prompt_tokens_details": {"cached_tokens": details.get("cached_tokens") or 0}}


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
    metrics["num-concurrent-requests"] = call.lease.concurrent
    return metrics


def metric_headers(call: Call, metrics: dict[str, Any]) -> dict[str, str]:
    headers = {f"fireworks-{key}": (f"{value:.6f}" if isinstance(value, float) else str(value))
               for key, value in metrics.items()}
    options = dict(call.plan.sampling_options)
    context = call.route.deployment.context_length
    if context and "prompt-tokens" in metrics:  # what truncate mode really allowed
        options["max_tokens"] = min(options["max_tokens"],
                                    max(context - metrics["prompt-tokens"], 0))
    headers["fireworks-sampling-options"] = orjson.dumps(options).decode()
    return headers


async def _texts(texts: TokenTexts, call: Call, payload: dict[str, Any]) -> dict[int, str]:
    if not call.plan.logprobs:
        return {}
    ids: set[int] = set()
    for choice in payload.get("choices") or []:
        ids |= token_ids_in(choice.get("logprobs"))
    return await texts.texts(call.route.deployment.name, call.worker_url, ids)


async def relay_json(client: WorkerClient, texts: TokenTexts, call: Call) -> Response:
    data, _ = await client.post_json(call.worker_url + call.path, call.body,
                                     call.upstream_headers())
    vocabulary = await _texts(texts, call, data)
    engine = data.pop("metrics", None)
    usage = usage_of(data.get("usage"))
    if call.plan.max_tokens == 0 and usage is not None:
        # A score-only request (echo, max_tokens 0): vLLM runs one step it does not return.
        usage["completion_tokens"] = 0
        usage["total_tokens"] = usage["prompt_tokens"]
    call.first_token_at = call.first_token_at or time.monotonic()
    reject_chat_abort(call.plan, data["choices"])
    if call.plan.echo_last is not None:
        for choice in data["choices"]:
            keep_last_prompt_logprobs(choice, call.plan.echo_last)
    choices = [shape_choice(choice, call.plan, vocabulary, ChoiceState(), chunk=False,
                            prompt_ids=data.get("prompt_token_ids"),
                            prompt_fragments=call.prompt_fragments)
               for choice in data["choices"]]
    for choice in choices:
        if call.plan.echo_texts:
            add_echo(call.plan, choice)
    out: dict[str, Any] = {
        "id": data["id"], "object": data["object"], "created": data["created"],
        "model": call.route.requested_model, "choices": choices, "usage": usage,
    }
    if call.plan.chat and call.plan.return_token_ids:
        out["prompt_token_ids"] = data.get("prompt_token_ids")
    metrics = perf_metrics(call, usage, engine, complete=True)
    if call.perf_metrics_in_response:
        out["perf_metrics"] = metrics
    response = Response(orjson.dumps(out), media_type="application/json",
                        headers=metric_headers(call, metrics))
    call.end("ok", 200, usage)
    return response


def echo_text(plan: Plan, index: int) -> str:
    return plan.echo_texts[min(index // plan.n, len(plan.echo_texts) - 1)]


def keep_last_prompt_logprobs(choice: dict[str, Any], keep: int) -> None:
    """echo_last=K on a worker choice: of the prompt's logprob positions keep the last K."""
    logprobs = choice.get("logprobs")
    prompt_len = len(choice.get("prompt_token_ids") or [])
    drop = prompt_len - min(keep, prompt_len)
    if not logprobs or drop <= 0:
        return
    for key, values in logprobs.items():
        if isinstance(values, list):
            logprobs[key] = values[drop:]


def add_echo(plan: Plan, choice: dict[str, Any]) -> None:
    """Put the echoed prompt in front of the text: vLLM leaves it out when asked for token
    ids, which the gateway always asks for with echo."""
    prefix = echo_text(plan, choice["index"])
    if plan.chat:
        choice["message"]["content"] = prefix + (choice["message"]["content"] or "")
    else:
        choice["text"] = prefix + choice["text"]


def _encode(chunk: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


class StreamReframer:
    """Turns the worker's chunks into Fireworks chunks (no I/O, unit-testable)."""

    def __init__(self, call: Call) -> None:
        self.call = call
        self.held_finish: list[dict[str, Any]] = []
        self.states: dict[int, ChoiceState] = {}
        self.prompt_ids: list[int] | None = None
        self.echoed: set[int] = set()
        # The latest usage the worker reported (every chunk carries it): what an aborted
        # stream had used when it stopped.
        self.last_usage: dict[str, Any] | None = None

    def chunk(self, chunk: dict[str, Any], texts: dict[int, str] | None = None) -> list[bytes]:
        engine = chunk.pop("metrics", None)
        if chunk.get("usage") is not None:
            self.last_usage = usage_of(chunk["usage"])
        if not chunk.get("choices"):
            if chunk.get("usage") is not None:
                return self.finish(chunk, usage_of(chunk["usage"]), engine)
            return []
        plan = self.call.plan
        if chunk.get("prompt_token_ids") is not None:
            self.prompt_ids = chunk["prompt_token_ids"]
        out: dict[str, Any] = {"id": chunk["id"], "object": chunk["object"],
                               "created": chunk["created"],
                               "model": self.call.route.requested_model}
        first = not self.states
        choices = []
        for choice in chunk["choices"]:
            state = self.states.setdefault(choice.get("index", 0), ChoiceState())
            choices.append(shape_choice(choice, plan, texts or {}, state, chunk=True,
                                        prompt_ids=self.prompt_ids if first else None,
                                        prompt_fragments=self.call.prompt_fragments))
        out["choices"] = choices
        if plan.chat and plan.return_token_ids and first:
            out["prompt_token_ids"] = self.prompt_ids
        out["usage"] = None
        parts = []
        if plan.echo_texts and not plan.chat:
            parts += self.echo_chunks(out, [c["index"] for c in choices])
        reject_chat_abort(plan, chunk["choices"])
        if any(c["finish_reason"] for c in choices):
            self.held_finish.append(out)  # usage is not known until the worker's last chunk
        else:
            parts.append(_encode(out))
        if plan.echo_texts and plan.chat:  # after the role chunk
            parts += self.echo_chunks(out, [c["index"] for c in choices])
        return parts

    def echo_chunks(self, template: dict[str, Any], indexes: list[int]) -> list[bytes]:
        """The echoed prompt, once per choice, as its own chunk."""
        parts = []
        for index in indexes:
            if index in self.echoed:
                continue
            self.echoed.add(index)
            text = echo_text(self.call.plan, index)
            choice: dict[str, Any] = {"index": index, "finish_reason": None, "logprobs": None}
            choice |= {"delta": {"content": text}} if self.call.plan.chat else {"text": text}
            parts.append(_encode({k: template[k] for k in ("id", "object", "created", "model")}
                                 | {"choices": [choice], "usage": None}))
        return parts

    def finish(self, last: dict[str, Any], usage: dict[str, Any] | None,
               engine: dict[str, Any] | None) -> list[bytes]:
        metrics = perf_metrics(self.call, usage, engine, complete=True)
        self.last_usage = usage
        out: list[bytes] = []
        on_finish = usage if self.call.include_usage is None else None
        for chunk in self.held_finish:
            chunk["usage"] = on_finish
            if self.call.perf_metrics_in_response:
                chunk["perf_metrics"] = metrics
            out.append(_encode(chunk))
        self.held_finish = []
        if self.call.include_usage:
            tail: dict[str, Any] = {
                "id": last.get("id", ""), "object": last.get("object", ""),
                "created": last.get("created", 0), "model": self.call.route.requested_model,
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


def _carries_token(chunk: dict[str, Any]) -> bool:
    for choice in chunk.get("choices") or []:
        delta = choice.get("delta") or {}
        if choice.get("text") or delta.get("content") or delta.get("tool_calls") \
                or delta.get("reasoning") or choice.get("finish_reason"):
            return True
    return False


class RelayedStream(StreamingResponse):
    """A stream whose end is accounted for however it ends: Starlette may cancel the body
    before it starts (the client left at once), which would skip the body's own cleanup."""

    def __init__(self, call: Call, body: AsyncIterator[bytes], reframer: StreamReframer,
                 headers: dict[str, str]) -> None:
        super().__init__(body, media_type="text/event-stream", headers=headers)
        self.call = call
        self.reframer = reframer
        self.events = body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.events, "aclose", None)
            if aclose is not None:
                await aclose()  # runs the body's finally now, if it started
            self.call.end("aborted", 499, self.reframer.last_usage)


async def relay_stream(client: WorkerClient, texts: TokenTexts, call: Call) -> Response:
    """Open the worker's stream and read it up to the first token. Failures up to here raise
    (nothing reached the client, so the request may be retried elsewhere)."""
    try:
        response = await client.open_stream(call.worker_url + call.path, call.body,
                                            call.upstream_headers())
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
            if _carries_token(event) or not event.get("choices"):
                call.first_token_at = time.monotonic()
                first_usage = event.get("usage")
                held += reframer.chunk(event, await _texts(texts, call, event))
                break
            held += reframer.chunk(event, await _texts(texts, call, event))
    except BaseException as exc:
        await response.aclose()
        call.lease.release()
        if isinstance(exc, (httpx.HTTPError, orjson.JSONDecodeError)):
            raise GatewayError(502, f"Upstream worker failed before the first token: {exc!r}",
                               replica_fault=True) from exc
        raise
    headers = metric_headers(call, perf_metrics(call, first_usage, None, complete=False))
    body = _stream_body(call, texts, response, events, reframer, held)
    return RelayedStream(call, body, reframer,
                         headers | {"cache-control": "no-cache", "x-accel-buffering": "no"})


async def _stream_body(call: Call, texts: TokenTexts, response: httpx.Response,
                       events: AsyncIterator[dict[str, Any] | None],
                       reframer: StreamReframer, held: list[bytes]) -> AsyncIterator[bytes]:
    response_id = f"stream-{uuid.uuid4()}"
    status, http_status = "aborted", 499  # unless the stream reaches its end
    try:
        for part in held:
            yield part
        async for event in events:
            if event is None:
                break
            response_id = event.get("id", response_id)
            for part in reframer.chunk(event, await _texts(texts, call, event)):
                yield part
        status, http_status = "ok", 200
        yield DONE
    except (httpx.HTTPError, orjson.JSONDecodeError) as exc:
        status, http_status = "error", 502
        yield stream_error_event(502, f"Upstream worker failed mid-stream: {exc!r}",
                                 response_id)
    except GatewayError as exc:
        status, http_status = "error", exc.status
        yield stream_error_event(exc.status, exc.message, response_id)
    finally:
        # Runs on normal end and on client disconnect: closing the worker connection makes
        # vLLM abort the request, so no tokens are generated for nobody.
        await response.aclose()
        call.end(status, http_status, reframer.last_usage)
