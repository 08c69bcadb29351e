"""Continuing a started stream on another replica when its worker fails: the data plane's
half (which replica, the failed one charged, the limit); the API's half is its framing's
`continuation` (gateway/api.py; fireworks/continuation.py for chat and completions)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import orjson

from gateway.api import CacheQuery, Call, Continuation, NotContinued, Served, StreamFraming
from gateway.controlplane.registry import Route
from gateway.dataplane.accounting import Tally, judged
from gateway.dataplane.attempt import Attempt
from gateway.dataplane.blame import Verdict
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

    async def migrate(self, life: Life, exc: GatewayError) -> WorkerAnswer | None:
        """The worker of a started stream failed (`exc`): the generation goes on on another
        replica of the deployment, token-exactly, when the API and the request allow it
        (the framing's `continuation`), up to GATEWAY_STREAM_MIGRATIONS times per request.
        The failed replica is charged as for any fault mid-stream. -> the new worker's
        answer, read on as the rest of the stream; None: the stream ends with the error."""
        gateway, tally, migration, failed = life.gateway, life.tally, self, life.attempt
        if migration.framing is None or failed is None or not exc.replica_fault:
            return None
        deployment, framing = migration.route.deployment, migration.framing
        outcome = migration.blocked(gateway)
        if outcome is None:
            try:
                continuation = framing.continuation()
            except NotContinued as declined:
                outcome = f"declined: {declined.reason}"
        if outcome is not None:  # it ends here, as without continuation
            gateway.metrics.stream_migrations.labels(deployment.name, outcome).inc()
            return None
        served, failed_url = failed.served, failed.lease.replica.url
        while outcome is None:
            # The replica just failed: charged now (the request ends elsewhere).
            url = life.attempt.lease.replica.url if life.attempt is not None else failed_url
            judged(gateway, tally, Verdict(url, retry=False, request_caused=False))
            tally.trace.attempt_ended(f"{exc.status}: {exc.message}")
            life.drop()
            tally.replica, tally.first_token_at = url, served.first_token_at
            tally.replica_judged = True  # (unless an attempt below ends the request)
            migration.count += 1
            lease = gateway.replicas.acquire(deployment, migration.affinity, migration.tried,
                                             migration.prefer,
                                             migration.cached(gateway, continuation),
                                             migration.call.sequences)
            attempt = life.begin(lease, migration.route, served)
            url = lease.replica.url
            migration.tried.add(url)
            tally.trace.routed(url, len(migration.tried), "continued")
            headers = {"x-request-id": life.request_id}
            tally.trace.propagate(headers)
            try:
                attempt.answer = await gateway.workers.open(
                    url + continuation.worker_path, orjson.dumps(continuation.body), headers)
                expect_type(attempt.answer, "text/event-stream")
            except GatewayError as again:
                gateway.metrics.stream_migrations.labels(deployment.name, "failed").inc()
                if not again.replica_fault:  # the worker judged the continuation itself
                    return None
                exc = again
                outcome = migration.blocked(gateway)
                continue
            tally.replica_judged = False
            continuation.sent_to(attempt.worker)
            attempt.movable(gateway.replicas, framing)
            gateway.metrics.stream_migrations.labels(deployment.name, "continued").inc()
            tally.trace.continued(failed_url, url, continuation.generated)
            logger.warning("request %s: stream continued on %s after %d tokens (%s failed)",
                           life.request_id, url, continuation.generated, failed_url)
            return attempt.answer
        # The last one tried failed too: charged, and the stream ends with the error.
        assert life.attempt is not None
        judged(gateway, tally, Verdict(life.attempt.lease.replica.url, retry=False,
                                       request_caused=False))
        tally.trace.attempt_ended(f"{exc.status}: {exc.message}")
        tally.replica = life.attempt.lease.replica.url
        life.drop()
        gateway.metrics.stream_migrations.labels(deployment.name, outcome).inc()
        return None
