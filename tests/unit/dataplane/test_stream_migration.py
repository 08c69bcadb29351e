"""A stream whose worker fails after its first token goes on on another replica, token-exactly
(dataplane/request.py `migrate`, fireworks/continuation.py), with scripted workers on real
sockets: `bad` (listed first, so chosen first) fails after five tokens in each way a worker
can fail; `good` continues from the token ids it is given. The client's text and token ids
equal an uninterrupted answer's, one usage record bills the prompt once and every token
once, and what is not continued ends as before, with the error event."""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gateway.dataplane.isolation import account_salt
from gateway.server.protocol import EdgeProtocol
from gateway.tracing import Tracing
from tests.unit.dataplane.test_kv_index import apply, stored
from tests.unit.fake_worker import KEY, MODEL, RESET, Pause, Stream
from tests.unit.harness import ADMIN, Harness, build, registry, serving

PROMPT = [1, 2, 3, 4]  # the prompt's token ids, as the scripted workers tokenize it
WHOLE = 12  # tokens in a whole answer (max_tokens)
CUT = 5  # tokens `bad` sends before it fails


def token(i: int) -> int:
    return 100 + i  # the i-th generated token


def text(i: int) -> str:
    return f"w{token(i)} "


EXPECTED_TEXT = "".join(text(i) for i in range(WHOLE))
EXPECTED_IDS = [token(i) for i in range(WHOLE)]


def event(body: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(body) + b"\n\n"


def chunks(chat: bool, prompt: list[int], start: int, stop: int) -> list[bytes | Pause]:
    """What vLLM streams with return_token_ids and continuous usage: tokens start..stop-1
    (counted from the first prompt's answer), one per chunk."""
    head = {"id": "cmpl-x", "created": 1, "model": "served",
            "object": "chat.completion.chunk" if chat else "text_completion"}
    out: list[bytes | Pause] = []
    if chat:
        out.append(event(head | {"prompt_token_ids": prompt, "choices": [
            {"index": 0, "delta": {"role": "assistant", "content": ""},
             "finish_reason": None}]}))
    for n, i in enumerate(range(start, stop)):
        choice: dict[str, Any] = {"index": 0, "token_ids": [token(i)], "finish_reason": None,
                                  "logprobs": None}
        choice |= {"delta": {"content": text(i)}} if chat else {"text": text(i)}
        if not chat and n == 0:
            choice["prompt_token_ids"] = prompt
        usage = {"prompt_tokens": len(prompt), "completion_tokens": n + 1,
                 "total_tokens": len(prompt) + n + 1}
        out.append(event(head | {"choices": [choice], "usage": usage}))
    finish: dict[str, Any] = {"index": 0, "finish_reason": "length", "token_ids": []}
    finish |= {"delta": {}} if chat else {"text": ""}
    usage = {"prompt_tokens": len(prompt), "completion_tokens": stop - start,
             "total_tokens": len(prompt) + stop - start}
    out += [event(head | {"choices": [finish], "usage": usage}),
            event(head | {"choices": [], "usage": usage}), b"data: [DONE]\n\n"]
    return out


def answer(request: httpx.Request, failure: list[bytes | Pause | Exception] | None
           ) -> httpx.Response:
    """The scripted engine: an original request from the start, a continuation (token ids
    that start with the prompt's) from where its prompt ends; `failure` after CUT tokens."""
    body = orjson.loads(request.content)
    chat = request.url.path.endswith("/chat/completions")
    prompt = body["prompt"] if isinstance(body.get("prompt"), list) else PROMPT
    start = len(prompt) - len(PROMPT)
    parts: list[bytes | Pause | Exception] = list(
        chunks(chat, prompt, start, start + body["max_tokens"]))
    if failure is not None:
        parts = [*parts[:CUT + (1 if chat else 0)], Pause(0.05), *failure]
    return httpx.Response(200, headers={"content-type": "text/event-stream"},
                          stream=Stream(parts))


ERROR_EVENT = event({"error": {"message": "engine died", "code": 500}})
# vLLM aborting the request (shutting down past its drain timeout): chat and completions alike
ABORTED = event({"id": "cmpl-x", "created": 1, "model": "served", "choices": [
    {"index": 0, "text": "", "delta": {}, "finish_reason": "abort"}]})
FAILURES = {
    "abort": [ABORTED, b"data: [DONE]\n\n"],
    "reset": [RESET],
    "error event": [ERROR_EVENT],
    "read timeout": [Pause(3)],
    "malformed event": [b"data: [1, 2]\n\n"],
    "eof without [DONE]": [],
}


def app(tmp_path: Path, failure: list[bytes | Pause | Exception], good_fails: bool = False,
        **settings: Any) -> Harness:
    def handler(request: httpx.Request) -> httpx.Response:
        fails = request.url.host == "bad" or good_fails
        return answer(request, failure if fails else None)

    return build(tmp_path, handler, hosts=("bad", "good"),
                 registry_of=lambda urls: registry([urls["bad"], urls["good"]]),
                 listed_order=True, upstream_read_timeout=1.0, eject_after_failures=100,
                 admin_key=ADMIN, **settings)


async def stream(h: Harness, chat: bool, **fields: Any) -> tuple[list[dict[str, Any]], str]:
    """The client's chunks, and the whole body as sent."""
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body = {"model": MODEL, "stream": True, "max_tokens": WHOLE, "return_token_ids": True}
    body |= {"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "hi"}
    async with h.running() as client:
        response = await client.post(path, json=body | fields,
                                     headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 200, response.text
    blocks = [b for b in response.text.split("\n\n") if b]
    assert blocks[-1] == "data: [DONE]", blocks[-3:]
    return [orjson.loads(b[6:]) for b in blocks[:-1] if b.startswith("data: ")], \
        response.text


def text_and_ids(chunks: list[dict[str, Any]], chat: bool) -> tuple[str, list[int]]:
    out, ids = "", []
    for chunk in chunks:
        for choice in chunk["choices"]:
            out += (choice["delta"].get("content") or "") if chat else choice["text"]
            ids += choice.get("token_ids") or []
    return out, ids


def counted(h: Harness, outcome: str) -> float:
    return h.gateway.metrics.registry.get_sample_value(
        "fwgw_stream_migrations_total", {"deployment": "accounts/fireworks/deployments/d",
                                         "outcome": outcome}) or 0.0


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "completions"])
@pytest.mark.parametrize("failure", list(FAILURES), ids=list(FAILURES))
async def test_a_stream_whose_worker_fails_goes_on_on_another_token_exactly(
        tmp_path: Path, failure: str, chat: bool) -> None:
    h = app(tmp_path, FAILURES[failure])
    sent, raw = await stream(h, chat)
    assert "event: error" not in raw
    assert text_and_ids(sent, chat) == (EXPECTED_TEXT, EXPECTED_IDS)
    ids = {chunk["id"] for chunk in sent}
    assert len(ids) == 1  # one response, whatever served it
    final = sent[-1]
    assert final["choices"][0]["finish_reason"] == "length"
    assert final["usage"]["prompt_tokens"] == len(PROMPT)  # billed once
    assert final["usage"]["completion_tokens"] == WHOLE
    if chat:
        roles = [c for c in sent if c["choices"] and c["choices"][0]["delta"].get("role")]
        assert len(roles) == 1  # no second role chunk at the seam
    # What `good` was asked: the prompt's ids and the five tokens sent, for the rest.
    asked = [r for r in h.workers.served.requests if r.url.host == "good"]
    assert [r.url.path for r in asked] == ["/v1/completions"]
    continuation = orjson.loads(asked[0].content)
    assert continuation["prompt"] == PROMPT + EXPECTED_IDS[:CUT]
    assert continuation["max_tokens"] == WHOLE - CUT
    assert continuation["stream"] is True and continuation["return_token_ids"] is True
    # One record, of the whole request; the failed replica charged, the counter and the log.
    (record,) = h.gateway.ledger.kept
    assert (record.status, record.http_status, record.replica) == ("ok", 200,
                                                                   h.workers.urls["good"])
    assert (record.prompt_tokens, record.completion_tokens) == (len(PROMPT), WHOLE)
    assert h.gateway.replicas.health.states[h.workers.urls["bad"]].failures == 1
    assert counted(h, "continued") == 1


async def test_a_declined_feature_ends_the_stream_as_before(tmp_path: Path) -> None:
    h = app(tmp_path, [RESET])
    sent, raw = await stream(h, False, seed=7)
    assert "event: error" in raw
    assert text_and_ids(sent, False) == ("".join(text(i) for i in range(CUT)),
                                         EXPECTED_IDS[:CUT])
    assert [r.url.host for r in h.workers.served.requests] == ["bad"]
    (record,) = h.gateway.ledger.kept
    assert (record.status, record.replica) == ("error", h.workers.urls["bad"])
    assert h.gateway.replicas.health.states[h.workers.urls["bad"]].failures == 1
    assert counted(h, "declined: seed") == 1 and counted(h, "continued") == 0


async def test_no_continuation_past_the_limit(tmp_path: Path) -> None:
    h = app(tmp_path, [RESET], stream_migrations=0)
    _, raw = await stream(h, True)
    assert "event: error" in raw
    assert [r.url.host for r in h.workers.served.requests] == ["bad"]
    assert counted(h, "limit") == 1


async def test_a_continuation_that_fails_too_ends_with_the_error_once(tmp_path: Path) -> None:
    """Both replicas fail mid-stream: `good` continues, then fails; no replica is left, so
    the client gets what both sent, then the error event. The same failure on both is the
    request's (blame.py): neither replica is charged."""
    h = app(tmp_path, [RESET], good_fails=True)
    sent, raw = await stream(h, False)
    assert raw.count("event: error") == 1
    assert text_and_ids(sent, False) == ("".join(text(i) for i in range(2 * CUT)),
                                         EXPECTED_IDS[:2 * CUT])
    (record,) = h.gateway.ledger.kept
    assert (record.status, record.http_status) == ("error", 502)
    assert record.completion_tokens == 2 * CUT and record.prompt_tokens == len(PROMPT)
    states = h.gateway.replicas.health.states
    assert all(states.get(url) is None or states[url].failures == 0
               for url in h.workers.urls.values())
    assert h.gateway.metrics.registry.get_sample_value(
        "fwgw_request_caused_failures_total",
        {"deployment": "accounts/fireworks/deployments/d"}) == 1
    assert counted(h, "continued") == 1 and counted(h, "no replica") == 1


async def test_nothing_is_left_behind(tmp_path: Path) -> None:
    """After a continued stream: no request in flight, no replica lease outstanding (each
    replica was leased once)."""
    h = app(tmp_path, [RESET])
    async with h.running() as client:
        response = await client.post("/v1/completions", json={
            "model": MODEL, "prompt": "hi", "stream": True, "max_tokens": WHOLE},
            headers={"Authorization": f"Bearer {KEY}"})
        assert "event: error" not in response.text
        metrics = (await client.get("/metrics", headers={"Authorization": f"Bearer {ADMIN}"})
                   ).text
    assert not re.search(r"fwgw_requests_in_flight\{[^}]*\} (?!0\.0)", metrics), metrics
    outstanding = h.gateway.replicas.outstanding
    assert set(outstanding) == set(h.workers.urls.values())  # both were leased
    assert all(count == 0 for count in outstanding.values())


def hanging(tmp_path: Path, hung: list[bool], fails_when_asked: bool = False,
            **settings: Any) -> Harness:
    """`bad` sends CUT tokens, then nothing more for 30 s (the read timeout: 60 s); its
    health check fails once hung[0] is set (by its first request when `fails_when_asked`).
    Health checks every 0.2 s, two failures eject."""
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health":
            return httpx.Response(503 if request.url.host == "bad" and hung[0] else 200)
        if request.url.path == "/metrics":
            return httpx.Response(200, text="")
        if request.url.host == "bad":
            hung[0] = hung[0] or fails_when_asked
            return answer(request, [Pause(30)])
        return answer(request, None)

    return build(tmp_path, handler, hosts=("bad", "good"),
                 registry_of=lambda urls: registry([urls["bad"], urls["good"]]),
                 listed_order=True, upstream_read_timeout=60.0, health_check_interval=0.2,
                 eject_after_failures=2, **settings)


async def test_a_stream_on_a_replica_that_fails_its_health_check_moves_at_once(
        tmp_path: Path) -> None:
    """vLLM past its drain timeout keeps a stream's connection open with nothing more to
    send. Once its replica fails the health checks (ejected), the stream is moved: long
    before the read timeout, and as exactly as after any other failure."""
    h = hanging(tmp_path, [False], fails_when_asked=True)
    started = time.monotonic()
    sent, raw = await stream(h, True)
    assert time.monotonic() - started < 10  # not the read timeout's 60 s
    assert "event: error" not in raw
    assert text_and_ids(sent, True) == (EXPECTED_TEXT, EXPECTED_IDS)
    assert counted(h, "continued") == 1


async def streamed_while(h: Harness, act: Callable[[httpx.AsyncClient], Awaitable[None]]
                         ) -> tuple[list[str], float]:
    """A completions stream through a real server (the in-process client would buffer it
    whole), `act` done once its first line came: every line, and how long it all took."""
    body = {"model": MODEL, "stream": True, "max_tokens": WHOLE, "prompt": "hi",
            "return_token_ids": True}
    started = time.monotonic()
    async with serving(h, EdgeProtocol) as (host, port), httpx.AsyncClient(
            base_url=f"http://{host}:{port}", timeout=60) as client, client.stream(
            "POST", "/v1/completions", json=body,
            headers={"Authorization": f"Bearer {KEY}"}) as response:
        lines = response.aiter_lines()
        first = await anext(lines)
        assert first.startswith("data: ")
        await act(client)
        rest = [line async for line in lines]
    return [first, *rest], time.monotonic() - started


async def test_a_replica_that_left_the_registry_is_watched_while_it_holds_streams(
        tmp_path: Path) -> None:
    """A pod that left DNS to terminate (here: removed through the admin API) keeps being
    health-checked while streams run on it, so that they still move when it stops."""
    hung = [False]
    h = hanging(tmp_path, hung, admin_key=ADMIN, registry_poll_interval=0.05)

    async def remove(client: httpx.AsyncClient) -> None:
        removed = await client.delete(
            "/admin/v1/accounts/fireworks/deployments/d/replicas",
            params={"url": h.workers.urls["bad"]},
            headers={"Authorization": f"Bearer {ADMIN}"})
        assert removed.status_code == 200, removed.text
        hung[0] = True  # it stops: from here its health check fails

    lines, took = await streamed_while(h, remove)
    assert took < 10
    assert not any(line.startswith("event: error") for line in lines)
    assert "data: [DONE]" in lines
    assert counted(h, "continued") == 1


async def test_streams_on_a_drained_replica_move_after_the_drain_time(tmp_path: Path) -> None:
    """Drained through the admin API: a stream still on it after GATEWAY_DRAIN_SECONDS goes
    on on another replica, with nothing lost or repeated."""
    h = hanging(tmp_path, [False], admin_key=ADMIN, registry_poll_interval=0.05,
                drain_seconds=0.5, discovery_interval=0.2)

    async def drain(client: httpx.AsyncClient) -> None:
        drained = await client.put(
            "/admin/v1/accounts/fireworks/deployments/d/replicas/drain",
            json={"url": h.workers.urls["bad"]}, headers={"Authorization": f"Bearer {ADMIN}"})
        assert drained.status_code == 200, drained.text

    lines, took = await streamed_while(h, drain)
    assert took < 10
    bad = h.gateway.replicas.health.states.get(h.workers.urls["bad"])
    assert bad is None or bad.failures == 0  # moved by the gateway: not the replica's fault
    chunks = [orjson.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert text_and_ids(chunks, False) == (EXPECTED_TEXT, EXPECTED_IDS)
    assert counted(h, "continued") == 1


async def test_a_continued_stream_is_one_trace_with_an_event_at_the_seam(
        tmp_path: Path) -> None:
    h = app(tmp_path, [RESET])
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    h.gateway.tracing = Tracing(provider)
    await stream(h, False)
    spans = exporter.get_finished_spans()
    (root,) = [s for s in spans if s.name == "POST /v1/completions"]
    (seam,) = [e for e in root.events if e.name == "stream continued"]
    assert seam.attributes == {"fireworks.failed_replica": h.workers.urls["bad"],
                               "fireworks.replica": h.workers.urls["good"],
                               "fireworks.generated_tokens": CUT}
    routes = [s.attributes for s in spans if s.name == "route" and s.attributes is not None]
    assert [r["fireworks.replica"] for r in routes] == [h.workers.urls["bad"],
                                                        h.workers.urls["good"]]
    assert routes[1]["fireworks.routing"] == "continued"


# Features that decline a continuation, as a client sends them (the table in
# tests/unit/fireworks/test_continuation.py has every one; these through the data plane).
DECLINING = [({"seed": 7}, "seed"), ({"n": 2}, "n"),
             ({"presence_penalty": 0.5}, "presence_penalty"),
             ({"frequency_penalty": 0.5}, "frequency_penalty"),
             ({"mirostat_target": 3.0}, "mirostat_target"),
             ({"response_format": {"type": "json_object"}}, "response_format"),
             ({"stop": ["\n"]}, "stop")]


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "completions"])
@pytest.mark.parametrize(("fields", "feature"), DECLINING, ids=[f for _, f in DECLINING])
async def test_each_declined_feature_ends_the_stream_as_before(
        tmp_path: Path, fields: dict[str, Any], feature: str, chat: bool) -> None:
    h = app(tmp_path, [RESET])
    sent, raw = await stream(h, chat, **fields)
    assert raw.count("event: error") == 1
    assert text_and_ids(sent, chat)[0] == "".join(text(i) for i in range(CUT))
    assert {r.url.host for r in h.workers.served.requests} == {"bad"}
    assert counted(h, f"declined: {feature}") == 1


async def test_the_continuation_goes_where_its_prefix_is_cached(tmp_path: Path) -> None:
    """Of two replicas left, the one whose KV events say it holds the prompt and the tokens
    so far continues the stream (the seam is far shorter there: docs/benchmarks.md)."""
    def handler(request: httpx.Request) -> httpx.Response:
        return answer(request, [RESET] if request.url.host == "bad" else None)

    h = build(tmp_path, handler, hosts=("bad", "cold", "warm"), listed_order=True,
              registry_of=lambda urls: registry([urls["bad"], urls["cold"], urls["warm"]]),
              eject_after_failures=100)
    urls = h.workers.urls
    index = h.gateway.kv_index
    index.known |= set(urls.values())
    salt = account_salt("fireworks", "")
    seen = PROMPT + EXPECTED_IDS[:CUT]  # what the continuation's prompt starts with
    apply(index, urls["bad"], stored([b"p"], None, seen[:4], [(salt,)]))
    apply(index, urls["warm"], stored([b"p", b"q"], None, seen[:8], [(salt,), None]))
    sent, raw = await stream(h, False, prompt=PROMPT)
    assert "event: error" not in raw
    assert text_and_ids(sent, False) == (EXPECTED_TEXT, EXPECTED_IDS)
    assert [r.url.host for r in h.workers.served.requests] == ["bad", "warm"]


async def test_a_token_in_the_same_read_as_the_failure_is_not_lost(tmp_path: Path) -> None:
    """A worker's last token and its abort arrive together: the token reaches the client
    before the continuation's first, and the continuation starts after it."""
    def handler(request: httpx.Request) -> httpx.Response:
        response = answer(request, None)
        if request.url.host == "bad":
            parts = list(response.stream.parts)  # type: ignore[attr-defined]
            last = parts[CUT - 1]
            assert isinstance(last, bytes)
            response.stream.parts = [*parts[:CUT - 1], Pause(0.05),  # type: ignore[attr-defined]
                                     last + ABORTED, b"data: [DONE]\n\n"]
        return response

    h = build(tmp_path, handler, hosts=("bad", "good"),
              registry_of=lambda urls: registry([urls["bad"], urls["good"]]),
              listed_order=True)
    sent, raw = await stream(h, False)
    assert "event: error" not in raw
    assert text_and_ids(sent, False) == (EXPECTED_TEXT, EXPECTED_IDS)
    (asked,) = [r for r in h.workers.served.requests if r.url.host == "good"]
    assert orjson.loads(asked.content)["prompt"] == PROMPT + EXPECTED_IDS[:CUT]


async def test_a_stream_with_nowhere_to_go_is_not_cut_when_its_replica_is_ejected(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """One replica: its health checks fail while it still generates (an overloaded pod).
    Ejection would move its streams, but there is no other replica: the stream is left to
    finish there."""
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health":
            return httpx.Response(503)
        if request.url.path == "/metrics":
            return httpx.Response(200, text="")
        response = answer(request, None)
        parts = list(response.stream.parts)  # type: ignore[attr-defined]
        response.stream.parts = [*parts[:CUT], Pause(1.0), *parts[CUT:]]  # type: ignore[attr-defined]
        return response

    h = build(tmp_path, handler, hosts=("solo",), health_check_interval=0.1,
              eject_after_failures=2)
    sent, raw = await stream(h, False)
    assert "event: error" not in raw
    assert text_and_ids(sent, False) == (EXPECTED_TEXT, EXPECTED_IDS)
    assert f"replica {h.workers.urls['solo']} ejected" in caplog.text  # while it ran


async def test_a_continuation_the_worker_refuses_charges_no_replica(tmp_path: Path) -> None:
    """The replica asked to continue refuses the request itself (a 400): the stream ends with
    the error event, and the first failure, followed by a refusal of the request, is the
    request's (blame.py): no replica is charged."""
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "good":
            return httpx.Response(400, json={"error": {"message": "too long", "code": 400}})
        return answer(request, [RESET])

    h = build(tmp_path, handler, hosts=("bad", "good"),
              registry_of=lambda urls: registry([urls["bad"], urls["good"]]),
              listed_order=True)
    sent, raw = await stream(h, False)
    assert raw.count("event: error") == 1
    assert text_and_ids(sent, False)[1] == EXPECTED_IDS[:CUT]
    states = h.gateway.replicas.health.states
    assert all(states.get(url) is None or states[url].failures == 0
               for url in h.workers.urls.values())
    (record,) = h.gateway.ledger.kept
    assert record.status == "error" and counted(h, "failed") == 1
