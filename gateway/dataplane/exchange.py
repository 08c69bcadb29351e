"""The owner of one admitted request: its attempts and its end.

An `Exchange` holds, at any time, at most one `Attempt` (a replica lease and the worker's
answer) and ends exactly once, on every path, in `end()`: the attempt is closed (which aborts
the worker request if it is still running), the lease released, the in-flight gauge lowered,
the usage record appended (which also settles the limits and frees the concurrency slot),
the metrics counted and the replica's health told. Each of those steps runs even if an
earlier one raised.

How a request ends: "ok"; "aborted" only when the client went away (499); "error" with the
real status otherwise.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from gateway.api import Call, Served, coerce_usage
from gateway.controlplane.limits import Admission
from gateway.controlplane.registry import Account, Route
from gateway.controlplane.usage import UsageRecord
from gateway.dataplane.parts import Gateway
from gateway.dataplane.queries import ReplicaWorker
from gateway.dataplane.replicas import Lease
from gateway.dataplane.workers import WorkerAnswer
from gateway.tracing import NO_TRACE, RequestTrace

logger = logging.getLogger("gateway.exchange")


@dataclass
class Attempt:
    """One try on one replica."""

    lease: Lease
    served: Served
    worker: ReplicaWorker
    answer: WorkerAnswer | None = None

    def close(self) -> None:
        """Abort the worker request if it is still open, and give the replica back."""
        try:
            if self.answer is not None:
                self.answer.close()
        finally:
            self.lease.release()


class Exchange:
    def __init__(self, gateway: Gateway, account: Account, route: Route, admission: Admission,
                 request_id: str, endpoint: str, call: Call, encoded: bytes,
                 trace: RequestTrace = NO_TRACE) -> None:
        self.gateway = gateway
        self.account = account
        self.route = route
        self.admission = admission
        self.request_id = request_id
        self.endpoint = endpoint
        self.call = call
        self.encoded = encoded  # the worker request, encoded once for every attempt
        self.trace = trace  # its spans (routes.py ends them after end())
        self.first_token_at: float | None = None
        self.started = time.monotonic()
        self.attempt: Attempt | None = None
        # The latest usage any attempt reported (a retry may report none).
        self.usage: object = None
        self.ended = False
        gateway.metrics.in_flight.labels(route.deployment.name).inc()

    @property
    def deployment(self) -> str:
        return self.route.deployment.name

    def begin(self, lease: Lease) -> Attempt:
        self.drop()
        served = Served(deployment=self.deployment,
                        backend_host=urlsplit(lease.replica.url).netloc,
                        concurrent=lease.concurrent, started=self.started,
                        routing=lease.routing)
        worker = ReplicaWorker(lease.replica.url.rstrip("/"), self.gateway.queries)
        self.attempt = Attempt(lease, served, worker)
        return self.attempt

    def drop(self) -> None:
        """Give up the current attempt (before retrying elsewhere, or at the end)."""
        attempt, self.attempt = self.attempt, None
        if attempt is not None:
            if attempt.served.usage is not None:
                self.usage = attempt.served.usage
            attempt.close()

    def end(self, status: str, http_status: int) -> None:
        """Exactly once per request, whatever happened (routes.py calls it in one
        `finally`; a second call is a no-op)."""
        if self.ended:
            return
        self.ended = True
        attempt = self.attempt
        try:
            self.drop()
        finally:
            try:
                self.gateway.metrics.in_flight.labels(self.deployment).dec()
            finally:
                self._account(attempt, status, http_status)

    def _account(self, attempt: Attempt | None, status: str, http_status: int) -> None:
        usage = coerce_usage(self.usage) or {}
        cached = usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)
        ended = time.monotonic()
        first_token = attempt.served.first_token_at if attempt is not None else None
        self.first_token_at = first_token
        replica = attempt.lease.replica.url if attempt is not None else ""
        try:
            record = UsageRecord(
                record_id=self.admission.record_id, request_id=self.request_id,
                account=self.account.id, deployment=self.deployment,
                model=self.route.model, replica=replica, endpoint=self.endpoint,
                status=status, http_status=http_status,
                prompt_tokens=usage.get("prompt_tokens", 0),
                cached_tokens=cached,
                completion_tokens=usage.get("completion_tokens", 0),
                ttft_ms=(first_token - self.started) * 1000 if first_token else None,
                duration_ms=(ended - self.started) * 1000, time=time.time(),
                metadata=self.call.metadata)
            self.gateway.ledger.finish(record, self.admission)
        except Exception:  # the slot must not leak: settle with what is known
            logger.exception("request %s: usage record failed", self.request_id)
            self.gateway.limiter.settle(self.admission, 0, 0)
        metrics = self.gateway.metrics
        deployment = self.deployment
        metrics.requests.labels(deployment, self.endpoint, str(http_status)).inc()
        if status == "error":
            metrics.errors.labels(deployment, str(http_status)).inc()
        if first_token is not None:
            metrics.time_to_first_token.labels(deployment).observe(first_token - self.started)
        metrics.latency.labels(deployment).observe(ended - self.started)
        for kind, count in (("prompt", usage.get("prompt_tokens", 0)),
                            ("cached", cached),
                            ("completion", usage.get("completion_tokens", 0))):
            if count:
                metrics.tokens.labels(deployment, kind).inc(count)
        if attempt is not None and status == "ok":
            self.gateway.replicas.health.success(attempt.lease.replica.url)
        elif attempt is not None and status == "error" and http_status in (502, 503, 504) \
                and first_token is not None:
            # Failed mid-stream. (Failures before the first byte are counted by the retry.)
            self.gateway.replicas.health.failure(attempt.lease.replica.url)


def new_record_id() -> str:
    # random, not uuid4: no system call per request (the generator is seeded from the OS
    # once per process); 128 bits keep ids unique across processes and gateways.
    return f"{random.getrandbits(128):032x}"
