"""Continuing a started stream on another replica when its worker fails: the data plane's
half (which replica, the failed one charged, the limit); the API's half is its framing's
`continuation` (gateway/api.py; fireworks/continuation.py for chat and completions)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import orjson

from gateway.api import CacheQuery, Call, Continuation, NotContinued, Served, StreamFraming
from gateway.controlplane.registry import Route
from gateway.dataplane.accounting import Tally, judged
from gateway.dataplane.attempt import Attempt
from gateway.dataplane.blame import Blame, Failure, Verdict
from gateway.dataplane.kv_index import CacheHint, cache_hint_now
from gateway.dataplane.parts import Gateway
from gateway.dataplane.relay import expect_type
from gateway.dataplane.replicas import Lease
from gateway.dataplane.workers import WorkerAnswer
from gateway.errors import GatewayError

logger = logging.getLogger("gateway.request")


class Life(Protocol):
    """What a migration needs of the request's life (request.py's RequestLife)."""

    gateway: Gateway
    tally: Tally
    request_id: str
    attempt: Attempt | None

    def begin(self, lease: Lease, route: Route, served: Served | None = None) -> Attempt: ...

    def drop(self, ended: bool = False) -> None: ...


@dataclass
class Migration:
    """What continuing a stream on another replica needs of its request (`migrate`)."""

    route: Route
    call: Call
    affinity: str | None
    prefer: Callable[[str], bool] | None
    tried: set[str]  # replicas this request went to
    framing: StreamFraming | None = None
    count: int = 0  # continuations tried
    blame: Blame = field(default_factory=Blame)  # the stream's failures, judged in turn

    def cached(self, gateway: Gateway, continuation: Continuation) -> CacheHint | None:
        """Which pods already hold the continuation's prompt (the request's prompt and the
        tokens so far), from their KV events: the seam is far shorter on one of them
        (docs/benchmarks.md, "The seam")."""
        prompt = continuation.body.get("prompt")
        if not gateway.kv_index.known or not isinstance(prompt, list):
            return None
        pods = [r.url for r in gateway.replicas.candidates(self.route.deployment, self.tried)]
        lora = self.route.lora
        return cache_hint_now(gateway.kv_index, pods, CacheQuery(
            token_ids=prompt, salt=continuation.body.get("cache_salt")),
            None if lora is None else lora.worker_name,
            context=self.route.deployment.context_length)

    def blocked(self, gateway: Gateway) -> str | None:
        """Why the stream cannot move (again) now; None: it can."""
        if self.count >= gateway.settings.stream_migrations:
            return "limit"
        if not gateway.replicas.candidates(self.route.deployment, self.tried):
            return "no replica"
        return None

    def movable(self, gateway: Gateway) -> bool:
        """Its stream could go on elsewhere now (what a move off its replica asks first)."""
        return self.framing is not None and self.framing.continuable() \
            and self.blocked(gateway) is None

    def judge(self, life: Life, attempt: Attempt, exc: GatewayError) -> None:
        """An attempt of the stream failed: blame.py's rule says whom to charge (a failure
        that follows the request from replica to replica is the request's); one the gateway
        cut itself to move the stream is nobody's."""
        life.tally.replica_judged = True  # (the request's end does not judge it again)
        if not attempt.moved:
            judged(life.gateway, life.tally,
                   self.blame.failed(attempt.lease.replica.url, Failure.of(exc)))

    def settle(self, life: Life) -> None:
        """At the request's end: the suspect still standing is charged (blame.py)."""
        suspect = self.blame.settle()
        if suspect is not None:
            judged(life.gateway, life.tally, Verdict(suspect, retry=False,
                                                     request_caused=False))

    async def migrate(self, life: Life, exc: GatewayError) -> WorkerAnswer | None:
        """The worker of a started stream failed (`exc`): the generation goes on on another
        replica of the deployment, token-exactly, when the API and the request allow it
        (the framing's `continuation`), up to GATEWAY_STREAM_MIGRATIONS times per request.
        -> the new worker's answer, read on as the rest of the stream; None: the stream ends
        with the error."""
        gateway, tally, failed = life.gateway, life.tally, life.attempt
        if self.framing is None or failed is None or not exc.replica_fault:
            return None
        deployment, framing = self.route.deployment, self.framing
        metric = gateway.metrics.stream_migrations
        outcome = self.blocked(gateway)
        if outcome is None:
            try:
                continuation = framing.continuation()
            except NotContinued as declined:
                outcome = f"declined: {declined.reason}"
        if outcome is not None:  # it ends here, as without continuation
            metric.labels(deployment.name, outcome).inc()
            if self.count:  # (a continuation failed: blame's rule, not the end's)
                self.judge(life, failed, exc)
            return None
        served, failed_url = failed.served, failed.lease.replica.url
        while True:
            attempt = life.attempt
            assert attempt is not None
            self.judge(life, attempt, exc)
            tally.trace.attempt_ended(f"{exc.status}: {exc.message}")
            tally.replica, tally.first_token_at = attempt.lease.replica.url, served.first_token_at
            if outcome is not None:  # the last one tried failed too: the stream ends
                life.drop()
                metric.labels(deployment.name, outcome).inc()
                return None
            life.drop()
            self.count += 1
            lease = gateway.replicas.acquire(deployment, self.affinity, self.tried,
                                             self.prefer, self.cached(gateway, continuation),
                                             self.call.sequences)
            attempt = life.begin(lease, self.route, served)
            url = lease.replica.url
            self.tried.add(url)
            tally.trace.routed(url, len(self.tried), "continued")
            headers = {"x-request-id": life.request_id}
            tally.trace.propagate(headers)
            try:
                if self.route.lora is not None:  # the adapter first, as for any attempt
                    await gateway.adapters.ensure(url, self.route.lora)
                attempt.answer = await gateway.workers.open(
                    url + continuation.worker_path, orjson.dumps(continuation.body), headers)
                expect_type(attempt.answer, "text/event-stream")
            except GatewayError as again:
                metric.labels(deployment.name, "failed").inc()
                if not again.replica_fault:  # the worker judged the continuation itself
                    self.judge(life, attempt, again)  # (which clears a suspect: blame.py)
                    return None
                exc, outcome = again, self.blocked(gateway)  # None: on to the next one
                continue
            tally.replica_judged = False
            continuation.sent_to(attempt.worker)
            attempt.movable(gateway.replicas, lambda: self.movable(gateway))
            metric.labels(deployment.name, "continued").inc()
            tally.trace.continued(failed_url, url, continuation.generated)
            logger.warning("request %s: stream continued on %s after %d tokens (%s failed)",
                           life.request_id, url, continuation.generated, failed_url)
            return attempt.answer
