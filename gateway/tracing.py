"""OpenTelemetry traces of inference requests: off unless the standard OTEL_* variables ask
for them (docs/operations.md, "Traces").

One span per request (`POST <path>`, kind server), continuing the client's W3C `traceparent`
when it sends one, with children: `admission` (translation and rate limits), `queue` (only
when the request waited in the gateway's queue), then per try a `route` (the replica chosen,
and why when the KV caches had a say) and an `attempt` (kind client: one worker request,
whose `traceparent` names this span, so that a worker started with vLLM's
`--otlp-traces-endpoint` continues the trace). The first token is an event on the request's
span; its end carries the HTTP status and the outcome.

With tracing off every request gets `NO_TRACE`, whose methods do nothing.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Mapping, MutableMapping

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

W3C = TraceContextTextMapPropagator()
NOTHING = contextlib.nullcontext()


class RequestTrace:
    """One request's spans."""

    def __init__(self, tracer: trace.Tracer, name: str, headers: Mapping[str, str],
                 request_id: str) -> None:
        self.tracer = tracer
        self.root = tracer.start_span(name, context=W3C.extract(headers), kind=SpanKind.SERVER,
                                      attributes={"fireworks.request_id": request_id})
        self.context = trace.set_span_in_context(self.root)
        self.attempt_span: Span | None = None

    def describe(self, **attributes: str) -> None:
        """What the request turned out to be (account, deployment, model)."""
        self.root.set_attributes({f"fireworks.{k}": v for k, v in attributes.items()})

    def phase(self, name: str) -> contextlib.AbstractContextManager[object]:
        return self.tracer.start_as_current_span(name, context=self.context)

    def waited(self, name: str, since: float) -> None:
        """A span from `since` (time.monotonic) to now, added only once it is known that
        there was a wait (the queue's common case is none)."""
        now_ns = time.time_ns()
        start_ns = now_ns - int((time.monotonic() - since) * 1e9)
        self.tracer.start_span(name, context=self.context, start_time=start_ns).end(now_ns)

    def routed(self, replica: str, number: int, why: str | None) -> None:
        attributes: dict[str, str | int] = {"fireworks.replica": replica,
                                            "fireworks.attempt": number}
        if why:
            attributes["fireworks.routing"] = why
        self.tracer.start_span("route", context=self.context, attributes=attributes).end()
        self.attempt_span = self.tracer.start_span(
            "attempt", context=self.context, kind=SpanKind.CLIENT, attributes=attributes)

    def propagate(self, headers: MutableMapping[str, str]) -> None:
        """The worker request's `traceparent`: the current attempt."""
        if self.attempt_span is not None:
            W3C.inject(headers, context=trace.set_span_in_context(self.attempt_span))

    def attempt_ended(self, error: str | None = None) -> None:
        span, self.attempt_span = self.attempt_span, None
        if span is not None:
            if error is not None:
                span.set_status(Status(StatusCode.ERROR, error))
            span.end()

    def continued(self, failed: str, replica: str, generated: int) -> None:
        """A stream continued on `replica` after `failed` failed, `generated` tokens in."""
        self.root.add_event("stream continued", attributes={
            "fireworks.failed_replica": failed, "fireworks.replica": replica,
            "fireworks.generated_tokens": generated})

    def end(self, status: str, http_status: int, first_token_at: float | None) -> None:
        self.attempt_ended()
        if first_token_at is not None:
            ago = time.monotonic() - first_token_at
            self.root.add_event("first token", timestamp=time.time_ns() - int(ago * 1e9))
        self.root.set_attributes({"http.response.status_code": http_status,
                                  "fireworks.outcome": status})
        if status == "error":
            self.root.set_status(Status(StatusCode.ERROR))
        self.root.end()


class NoTrace(RequestTrace):
    """Tracing off: nothing is recorded, nothing is sent."""

    def __init__(self) -> None:
        self.attempt_span = None

    def describe(self, **attributes: str) -> None:
        return None

    def phase(self, name: str) -> contextlib.AbstractContextManager[object]:
        return NOTHING  # (a shared object: no generator per request)

    def waited(self, name: str, since: float) -> None:
        return None

    def routed(self, replica: str, number: int, why: str | None) -> None:
        return None

    def propagate(self, headers: MutableMapping[str, str]) -> None:
        return None

    def attempt_ended(self, error: str | None = None) -> None:
        return None

    def continued(self, failed: str, replica: str, generated: int) -> None:
        return None

    def end(self, status: str, http_status: int, first_token_at: float | None) -> None:
        return None


NO_TRACE = NoTrace()


class Tracing:
    """Where requests' spans go; `provider` None: nowhere (tracing off)."""

    def __init__(self, provider: TracerProvider | None = None) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer("fireworks-gateway") if provider else None

    def start(self, name: str, headers: Mapping[str, str], request_id: str) -> RequestTrace:
        if self.tracer is None:
            return NO_TRACE
        return RequestTrace(self.tracer, name, headers, request_id)

    def shutdown(self) -> None:
        if self.provider is not None:
            self.provider.shutdown()


def exporter_from_env(env: Mapping[str, str]) -> SpanExporter | None:
    """The exporter the standard variables name: OTEL_TRACES_EXPORTER (`otlp`, `console`,
    `none`), or an OTLP endpoint alone (OTEL_EXPORTER_OTLP[_TRACES]_ENDPOINT); the OTLP
    protocol from OTEL_EXPORTER_OTLP[_TRACES]_PROTOCOL (`grpc`, else HTTP/protobuf). The
    exporters read their endpoint, headers and timeouts from the same variables."""
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return None
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or \
        env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    kind = env.get("OTEL_TRACES_EXPORTER", "otlp" if endpoint else "none").lower()
    if kind == "console":
        return ConsoleSpanExporter()
    if kind != "otlp":
        return None
    protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or \
        env.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        return OTLPSpanExporter()  # type: ignore[no-any-return]
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HttpExporter,
    )
    return HttpExporter()


def tracing_from_env(env: Mapping[str, str] = os.environ) -> Tracing:
    exporter = exporter_from_env(env)
    if exporter is None:
        return Tracing()
    provider = TracerProvider(resource=Resource.create(
        {"service.name": env.get("OTEL_SERVICE_NAME", "fireworks-gateway")}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return Tracing(provider)
