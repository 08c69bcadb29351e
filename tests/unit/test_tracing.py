"""OpenTelemetry traces (gateway/tracing.py): the span tree of a streamed request that fails
over, the client's traceparent continued and the attempt's passed to the worker, an
in-process exporter; and which exporter the standard OTEL_* variables pick."""

from __future__ import annotations

from pathlib import Path

import httpx
import orjson
import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as Grpc
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as Http
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from gateway.tracing import NO_TRACE, Tracing, exporter_from_env, tracing_from_env
from tests.unit.fake_worker import KEY, MODEL, Stream, chunk
from tests.unit.harness import build

USAGE = {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
CLIENT_PARENT = f"00-{TRACE_ID}-b7ad6b7169203331-01"


async def test_a_streamed_request_that_fails_over_gives_one_span_tree(tmp_path: Path) -> None:
    seen: dict[str, str | None] = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen[request.url.host] = request.headers.get("traceparent")
        if request.url.host == "bad":
            return httpx.Response(500, json={"message": "boom"})
        return httpx.Response(200, stream=Stream([chunk("good"), chunk("", "stop"),
                                                  chunk(usage=USAGE), b"data: [DONE]\n\n"]))

    h = build(tmp_path, handler, hosts=("bad", "good"), listed_order=True)
    workers = h.workers
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    h.gateway.tracing = Tracing(provider)
    async with h.running() as client:
        response = await client.post(
            "/inference/v1/completions", json={"model": MODEL, "prompt": "x", "stream": True},
            headers={"authorization": f"Bearer {KEY}", "traceparent": CLIENT_PARENT})
        assert response.status_code == 200 and b"good" in response.content

    spans = exporter.get_finished_spans()
    root = next(s for s in spans
                if s.parent is not None and s.parent.span_id == 0xB7AD6B7169203331)
    assert root.name == "POST /inference/v1/completions" and root.kind == SpanKind.SERVER
    assert f"{root.context.trace_id:032x}" == TRACE_ID  # the client's trace, continued
    assert root.attributes is not None
    assert root.attributes["http.response.status_code"] == 200
    assert root.attributes["fireworks.outcome"] == "ok"
    assert root.attributes["fireworks.deployment"] == "accounts/fireworks/deployments/d"
    assert [e.name for e in root.events] == ["first token"]
    children = sorted((s for s in spans if s.parent is not None
                       and s.parent.span_id == root.context.span_id),
                      key=lambda s: s.start_time or 0)
    assert [s.name for s in children] == ["admission", "route", "attempt", "route", "attempt"]
    routes = [s.attributes["fireworks.replica"] for s in children if s.name == "route"
              if s.attributes is not None]
    assert routes == [workers.urls["bad"], workers.urls["good"]]
    failed, served = (s for s in children if s.name == "attempt")
    assert failed.status.status_code == StatusCode.ERROR and "500" in (
        failed.status.description or "")
    assert served.status.status_code == StatusCode.UNSET and served.kind == SpanKind.CLIENT
    assert all(s.context.trace_id == root.context.trace_id for s in children)
    # Each worker was asked under its own attempt's span.
    for host, span in (("bad", failed), ("good", served)):
        assert seen[host] == f"00-{TRACE_ID}-{span.context.span_id:016x}-01"
    assert root.end_time is not None and served.end_time is not None
    assert root.end_time >= served.end_time  # the request ends after its last attempt


async def test_without_otel_variables_nothing_is_traced(tmp_path: Path) -> None:
    seen: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("traceparent"))
        return httpx.Response(200, json={"id": "c", "object": "text_completion", "created": 1,
                                         "usage": USAGE, "choices": [
                                             {"index": 0, "text": "a",
                                              "finish_reason": "stop"}]})

    h = build(tmp_path, handler)
    assert h.gateway.tracing.start("x", {}, "r") is NO_TRACE
    async with h.running() as client:
        response = await client.post("/inference/v1/completions",
                                     json={"model": MODEL, "prompt": "x"},
                                     headers={"authorization": f"Bearer {KEY}",
                                              "traceparent": CLIENT_PARENT})
    assert response.status_code == 200 and orjson.loads(response.content)["choices"]
    assert seen == [None]  # a client's traceparent is not passed on when tracing is off


@pytest.mark.parametrize("env,exporter", [
    ({}, None),
    ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, None),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, Http),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, Http),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
     Grpc),
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc"}, Grpc),
    ({"OTEL_TRACES_EXPORTER": "console"}, ConsoleSpanExporter),
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}, None),
])
def test_the_standard_variables_pick_the_exporter(env: dict[str, str],
                                                  exporter: type | None) -> None:
    picked = exporter_from_env(env)
    assert (picked is None) if exporter is None else isinstance(picked, exporter)
    tracing = tracing_from_env(env)
    assert (tracing.provider is None) == (exporter is None)
    tracing.shutdown()
