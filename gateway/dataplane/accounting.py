"""How a request ended, recorded once: the usage record (which settles the account's limits
and frees its concurrency slot), the request metrics, the replica's health verdict and the
trace's end. `record_end` is the one function that makes those records; request.py calls it
exactly once per request, in one `finally`, on every path (refused, failed, answered, the
client gone, the task cancelled). Each step runs even if an earlier one raised.

How a request ends: "ok"; "aborted" only when the client went away (499); "error" with the
real status otherwise. A request refused before admission (no key, a bad body, a limit) has
no usage record: it is counted in the metrics only.

Health is told here too during the attempts (`judged`): a replica that cannot be reached is
counted at once, so that other requests need not wait for this one's end to learn it.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any

from gateway.api import coerce_usage
from gateway.controlplane.limits import Admission
from gateway.controlplane.registry import Account, Route
from gateway.controlplane.usage import UsageRecord
from gateway.dataplane.blame import Verdict
from gateway.dataplane.parts import Gateway
from gateway.tracing import RequestTrace

logger = logging.getLogger("gateway.accounting")


@dataclass(slots=True)
class Tally:
    """What a request's end is recorded from, filled in as the request goes."""

    endpoint: str  # the API's worker path: the metrics' and usage records' label
    request_id: str
    trace: RequestTrace
    batch: str = ""  # the batch job it is a line of (gateway/batch/), if any
    account: Account | None = None
    route: Route | None = None  # once resolved
    admission: Admission | None = None  # once admitted: from here a usage record is owed
    metadata: dict[str, str] | None = None  # the client's, kept with the usage record
    started: float = field(default_factory=time.monotonic)  # reset at admission
    in_flight: str = ""  # the deployment counted in flight (admitted on: a fallback moves on)
    replica: str = ""  # of the attempt the request ended on
    replica_judged: bool = False  # its failure was already told (a stream's continuation)
    first_token_at: float | None = None  # ... and its first token
    usage: object = None  # the latest usage any attempt reported, as sent

    @property
    def deployment(self) -> str:
        return self.route.deployment.name if self.route is not None else ""


def admitted(gateway: Gateway, tally: Tally, admission: Admission,
             metadata: dict[str, str] | None) -> None:
    """The request holds its reservation from here; call with no await since it was made."""
    tally.admission, tally.metadata = admission, metadata
    tally.started = time.monotonic()
    tally.in_flight = tally.deployment
    gateway.metrics.in_flight.labels(tally.in_flight).inc()


def judged(gateway: Gateway, tally: Tally, verdict: Verdict) -> None:
    """One failed attempt's verdict (blame.py), told as it is made."""
    if verdict.blame_now is not None:
        gateway.replicas.health.failure(verdict.blame_now)
    if verdict.request_caused:
        gateway.metrics.request_caused.labels(tally.deployment).inc()


def record_end(gateway: Gateway, tally: Tally, status: str, http_status: int, *,
               refused: bool) -> None:
    """Exactly once per request, whatever happened. `refused`: the client is told this
    error (not so when the client left, or the server cancelled the request's task); before
    admission only such a refusal is counted."""
    try:
        if tally.admission is not None:
            _admitted_end(gateway, tally, tally.admission, status, http_status)
        elif refused:  # refused before admission
            _count(gateway, tally, status, http_status)
    finally:
        tally.trace.end(status, http_status, tally.first_token_at)


def _admitted_end(gateway: Gateway, tally: Tally, admission: Admission, status: str,
                  http_status: int) -> None:
    usage = coerce_usage(tally.usage) or {}
    try:
        gateway.metrics.in_flight.labels(tally.in_flight).dec()
    finally:
        try:
            _usage_record(gateway, tally, admission, usage, status, http_status)
        finally:
            try:
                _metrics(gateway, tally, usage, status, http_status)
            finally:
                _health(gateway, tally, status, http_status)


def _metrics(gateway: Gateway, tally: Tally, usage: dict[str, Any], status: str,
             http_status: int) -> None:
    deployment, metrics = tally.deployment, gateway.metrics
    cached = usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)
    ended, first_token = time.monotonic(), tally.first_token_at
    _count(gateway, tally, status, http_status)
    if first_token is not None:
        metrics.time_to_first_token.labels(deployment).observe(first_token - tally.started)
    metrics.latency.labels(deployment).observe(ended - tally.started)
    for kind, count in (("prompt", usage.get("prompt_tokens", 0)), ("cached", cached),
                        ("completion", usage.get("completion_tokens", 0))):
        if count:
            metrics.tokens.labels(deployment, kind).inc(count)


def _count(gateway: Gateway, tally: Tally, status: str, http_status: int) -> None:
    """The request counters: every request by status, errors apart."""
    gateway.metrics.requests.labels(tally.deployment, tally.endpoint, str(http_status)).inc()
    if status == "error":
        gateway.metrics.errors.labels(tally.deployment, str(http_status)).inc()


def _usage_record(gateway: Gateway, tally: Tally, admission: Admission, usage: dict[str, Any],
                  status: str, http_status: int) -> None:
    """The usage record, which also settles the limits; settled with what is known when
    the record cannot be made (the slot must not leak)."""
    try:
        route = tally.route
        assert tally.account is not None and route is not None  # admitted
        first_token = tally.first_token_at
        record = UsageRecord(
            record_id=admission.record_id, request_id=tally.request_id,
            account=tally.account.id, deployment=tally.deployment, model=route.model,
            replica=tally.replica, endpoint=tally.endpoint, status=status,
            http_status=http_status, prompt_tokens=usage.get("prompt_tokens", 0),
            cached_tokens=usage.get("prompt_tokens_details", {}).get("cached_tokens", 0),
            completion_tokens=usage.get("completion_tokens", 0),
            ttft_ms=(first_token - tally.started) * 1000 if first_token else None,
            duration_ms=(time.monotonic() - tally.started) * 1000, time=time.time(),
            metadata=tally.metadata, batch=tally.batch,
            router=route.router.name if route.router is not None else "",
            fallback=route.fallback)
        gateway.ledger.finish(record, admission)
    except Exception:
        logger.exception("request %s: usage record failed", tally.request_id)
        # As reserved: with Redis the reservation stays spent too (nothing settles it).
        gateway.limiter.settle(admission, admission.prompt_reserved,
                               admission.generated_reserved)


def _health(gateway: Gateway, tally: Tally, status: str, http_status: int) -> None:
    """The verdict on the replica the request ended on: it succeeded when the request did,
    or failed when its stream broke after the first token (failures before that were judged
    attempt by attempt: `judged`)."""
    health = gateway.replicas.health
    if not tally.replica or tally.replica_judged:
        return
    if status == "ok":
        health.success(tally.replica)
    elif status == "error" and http_status in (502, 503, 504) \
            and tally.first_token_at is not None:
        health.failure(tally.replica)


def new_record_id() -> str:
    # random, not uuid4: no system call per request (the generator is seeded from the OS
    # once per process); 128 bits keep ids unique across processes and gateways.
    return f"{random.getrandbits(128):032x}"
