"""One inference request's life, whatever its API, from its headers to its end.

`serve` is the whole of it, in order:
1. the account's key and the declared size, before any byte of the body is read;
2. the body read (bounded), parsed by the API's request model, the model resolved to a
   Route (deployment, replica set, adapter);
3. translated by the API into its Call, salted with its account (isolation.py), encoded
   once, and admitted against the account's limits (the reservation is held from here:
   accounting.admitted);
4. what each pod holds of its prompt (KV events), and its turn in the deployment's queue;
5. up to two attempts: a replica leased, the worker asked, its answer checked up to the first
   token (relay.py); on a replica's fault before any byte reached the client, once more on
   another replica. Whom a failure blames is blame.py's rule;
6. the reply sent (whole, or the stream relayed);
7. the end, recorded once in `finally` (accounting.record_end), whatever happened: the client
   leaving at any moment cancels the task, which closes the worker request.

What differs between APIs is the API object's and its Call's (gateway/api.py); nothing here
names an API.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from typing import Any
from urllib.parse import urlsplit

import orjson

from gateway.api import Call, InferenceApi, Served
from gateway.config import Settings
from gateway.controlplane.limits import Admission, RateLimited
from gateway.controlplane.registry import Account, Route
from gateway.dataplane.accounting import Tally, admitted, judged, new_record_id, record_end
from gateway.dataplane.affinity import affinity_key
from gateway.dataplane.attempt import Attempt
from gateway.dataplane.blame import Blame, Failure, Verdict
from gateway.dataplane.isolation import isolate
from gateway.dataplane.kv_index import CacheHint, cache_hint
from gateway.dataplane.migration import Migration
from gateway.dataplane.parts import Gateway
from gateway.dataplane.queries import ReplicaWorker
from gateway.dataplane.relay import HeldStream, PlainReply, open_stream, read_plain
from gateway.dataplane.replicas import Lease
from gateway.dataplane.targets import passes_over, route_headers, route_to
from gateway.dataplane.workers import WorkerAnswer
from gateway.errors import GatewayError, WorkerFault, bytes_headers, error_headers
from gateway.server.client import Client, api_key, check_declared_length
from gateway.validation import check_metadata, parse_body

logger = logging.getLogger("gateway.request")
ATTEMPTS = 2  # the first try and one retry on another replica
# vLLM's priority scheduler runs a lower value first: interactive requests are 0 (or the
# priority tier's, below it), batch lines this.
BATCH_PRIORITY = 100
# Pins the deployment while the body keeps the model id (as `<model>#<deployment>` does).
DEPLOYMENT_HEADER = "fireworks-deployment"
ClientReply = PlainReply | HeldStream  # what goes back to the client


async def serve(gateway: Gateway, api: InferenceApi[Any], client: Client) -> None:
    """POST <prefix><api.path>: the request's whole life (see the module's docstring)."""
    headers, request_id = client.headers, client.request_id
    tally = Tally(api.worker_path, request_id,
                  gateway.tracing.start(f"POST {client.path}", headers, request_id),
                  batch=client.batch.job if client.batch is not None else "")
    # The key and the declared size are checked before the body is read: a client without
    # a key costs a bounded amount, whatever it sends.
    try:
        tally.account = _account(gateway, client)
        check_declared_length(headers, gateway.settings)
        raw = await client.read_body(gateway.settings)
    except asyncio.CancelledError:  # the client left while sending its request
        record_end(gateway, tally, "aborted", 499, refused=False)
        return
    except GatewayError as exc:
        record_end(gateway, tally, "error", exc.status, refused=True)
        exc.headers.setdefault("connection", "close")  # the body was not read
        await _send_error(client, exc, api)
        return
    life = RequestLife(gateway, api, client, tally, tally.account)
    error: GatewayError | None = None
    outcome = ("error", 500)  # unless a path below says otherwise
    client.watch()  # from here, a client that leaves cancels the request
    try:
        outcome = await life.run(raw)
    except asyncio.CancelledError:
        if not client.gone:
            raise
        current = asyncio.current_task()
        if current is not None:
            current.uncancel()
        outcome = ("aborted", 499)
    except GatewayError as exc:
        error, outcome = exc, ("error", exc.status)
    except Exception:
        logger.exception("request %s: unexpected error", request_id)
        error = GatewayError(500, "Internal error")
    finally:
        # The one place a request ends: no await since the last send (Client.unwatch).
        client.unwatch()
        try:
            life.drop(ended=True)
        finally:
            record_end(gateway, tally, *outcome, refused=error is not None)
    if error is not None:
        if error.status >= 500:
            logger.warning("request %s failed: %s %s", request_id, error.status,
                           error.message)
        if not client.responded:
            await _send_error(client, error, api)


def _account(gateway: Gateway, client: Client) -> Account:
    """The client's account, by its key; a batch line's is its job's (authorized when the
    job was made), which must still exist."""
    registry, line = gateway.store.current, client.batch
    if line is None:
        return registry.authenticate(api_key(client.headers))
    account = registry.account(line.account)
    if account is None:
        raise GatewayError(401, f"The account {line.account} no longer exists")
    return account


async def _send_error(client: Client, error: GatewayError, api: InferenceApi[Any]) -> None:
    await client.whole(error.status, error_headers(error),
                       orjson.dumps(api.error_body(error, client.request_id)))


class RequestLife:
    """An authenticated request with its body: steps 2-6 of the module's docstring. It
    holds at most one Attempt at a time, and reports into the Tally what the end needs."""

    def __init__(self, gateway: Gateway, api: InferenceApi[Any], client: Client,
                 tally: Tally, account: Account) -> None:
        self.gateway, self.api, self.client = gateway, api, client
        self.tally, self.account = tally, account
        self.request_id = client.request_id
        line = client.batch  # a batch line's record id is the line's, on every run
        self.record_id = new_record_id() if line is None else line.record_id
        self.attempt: Attempt | None = None
        self.migration: Migration | None = None  # once a stream's attempt has opened

    async def run(self, raw: bytes) -> tuple[str, int]:
        """-> how the request ended, once the reply was sent. Its targets are taken in turn
        until one answers up to the first byte: the next one only after a failure
        targets.py passes over (each deployment once, whether named or chosen by a router);
        the last failure is the answer. Nothing falls back once the reply is being sent."""
        gateway = self.gateway
        request: Any = parse_body(raw, self.api.request_model, gateway.settings)
        registry = gateway.store.current
        targets = registry.resolve(request.model, self.account,
                                   self.client.headers.get(DEPLOYMENT_HEADER))
        passed: list[str] = []
        tried: set[str] = set()
        failed: GatewayError | None = None
        for target in targets.order:
            try:
                route = route_to(target, targets, registry, gateway.replicas,
                                 ",".join(passed), tried)
                if route is None:
                    continue
                tried.add(route.deployment.name)
                reply = await self.on_route(request, route)
            except GatewayError as exc:
                reason = passes_over(exc)
                if reason is None:
                    raise
                failed = exc
                passed.append(f"{reason}:{target.name}")
                if target is not targets.order[-1]:
                    gateway.metrics.fallbacks.labels(target.name, reason).inc()
                    self.tally.trace.attempt_ended(f"{exc.status}: {exc.message}; next "
                                                   "target")
                continue
            return await reply.send(self.client)
        assert failed is not None  # the first target is never skipped
        raise failed

    async def on_route(self, request: Any, route: Route) -> ClientReply:
        """The request on one deployment: admitted on the first (once, whatever follows),
        translated for each, its turn in the deployment's queue, its attempts."""
        gateway, tally = self.gateway, self.tally
        tally.route = route
        tally.trace.describe(account=self.account.id, deployment=route.deployment.name,
                             model=route.model)
        if tally.admission is None:
            with tally.trace.phase("admission"):
                call, encoded = self.translate(request, route)
                await self.admit(call, route)
        else:  # a fallback target: its own defaults, the admission made on the first
            call, encoded = self.translate(request, route)
            await self.reserve_more(call, route)
        # The pods' caches are looked up before the queue turn (the lease is taken right
        # after it, with no await between: the room the queue let it go for is still there;
        # the hint is counted again then).
        hint = await self.cache_hint(route, call, len(encoded)) \
            if gateway.kv_index.known else None
        queued_at = time.monotonic()
        if await gateway.queues.turn(route.deployment, self.account, call.priority,
                                     call.sequences, batch=self.client.batch is not None):
            tally.trace.waited("queue", queued_at)
        affinity = affinity_key(self.client.headers, call,
                                gateway.settings.prefix_affinity_bytes)
        return await self.attempts(route, call, encoded, affinity, hint)

    def translate(self, request: Any, route: Route) -> tuple[Call, bytes]:
        """The API's Call for the route's deployment, isolated, encoded once and bounded."""
        gateway, account, deployment = self.gateway, self.account, route.deployment
        line = self.client.batch
        call = self.api.translate(request, route, gateway.settings, account=account.id,
                                  nonce=self.record_id)
        if route.lora is not None:  # the adapter, by the name its workers know it
            call.body["model"] = route.lora.worker_name
        isolate(call, account.id, self.record_id)
        check_metadata(call.metadata)  # it goes into the usage record
        if not account.priority_tier or line is not None:
            # The registry's entitlement, whatever the API made; a batch line never has it.
            call.priority = False
            call.body.pop("priority", None)
        if line is not None and deployment.priority_scheduling:
            call.body["priority"] = BATCH_PRIORITY  # behind every interactive one there too
        return call, bounded(call, gateway.settings)

    async def admit(self, call: Call, route: Route) -> None:
        """Reserve against the account's limits and budgets: from here a record is owed."""
        gateway, account, deployment = self.gateway, self.account, route.deployment
        if gateway.ledger.backlogged:
            raise GatewayError(503, "Usage records cannot be written at the moment; new "
                                    "requests are refused until they can",
                               headers={"retry-after": "5"})
        admission = Admission(self.record_id, account.id)  # unlimited: nothing to reserve
        if account.limits.any() or account.budgets:
            try:
                admission = await gateway.limiter.admit(account, call.prompt_estimate(),
                                                        generation_bound(call, route),
                                                        self.record_id)
            except RateLimited as exc:
                gateway.metrics.rate_limited.labels(deployment.name, exc.kind).inc()
                raise
        admitted(gateway, self.tally, admission, call.metadata)

    async def reserve_more(self, call: Call, route: Route) -> None:
        """A fallback that may generate more than the admission reserved (a longer context,
        a larger default max_tokens) reserves the difference under the same limits and
        budgets first: refused, the request ends with their 429."""
        admission = self.tally.admission
        assert admission is not None
        more = generation_bound(call, route) - admission.generated_reserved
        # (Admitted unchecked while Redis was away: its usage counts when it settles.)
        if admission.limited and admission.bucket is not None and more > 0:
            try:
                await self.gateway.limiter.extend(self.account, admission, more)
            except RateLimited as exc:
                self.gateway.metrics.rate_limited.labels(route.deployment.name,
                                                         exc.kind).inc()
                # Admitted, so it has its usage record: the same request id again would be
                # counted once (a batch line's), so it is not to be sent again as it is.
                exc.headers["x-should-retry"] = "false"
                raise

    async def cache_hint(self, route: Route, call: Call, size: int) -> CacheHint | None:
        """What each pod in rotation holds of the request's prompt, from the pods' KV-cache
        events (kv_index.py); a random one of them tokenizes the prompt when it is text (a
        worker request of `size` bytes), within the bounds kv_index.cache_hint sets."""
        gateway, lora = self.gateway, route.lora
        pods = [r.url for r in gateway.replicas.in_rotation(route.deployment)]
        if not pods:
            return None
        tokenizer = ReplicaWorker(random.choice(pods).rstrip("/"), gateway.queries)
        return await cache_hint(gateway.kv_index, pods, call.cache_query(),
                                None if lora is None else lora.worker_name, tokenizer,
                                size=size, context=route.deployment.context_length,
                                deadline=gateway.settings.kv_tokenize_timeout)

    async def attempts(self, route: Route, call: Call, encoded: bytes, affinity: str | None,
                       hint: CacheHint | None) -> ClientReply:
        """Attempts on replicas until one answers well up to its first token; whom each
        failure blames is blame.py's rule."""
        gateway, tally, deployment = self.gateway, self.tally, route.deployment
        lora = route.lora
        prefer = None if lora is None else (lambda url: gateway.adapters.holds(url, lora))
        tried: set[str] = set()
        blame = Blame()
        self.migration = Migration(route, call, affinity, prefer, tried)
        try:
            for number in range(1, ATTEMPTS + 1):
                lease = gateway.replicas.acquire(deployment, affinity, self.avoid(route, tried),
                                                 prefer, hint, call.sequences)
                attempt = self.begin(lease, route)
                url = lease.replica.url
                tried.add(url)
                tally.trace.routed(url, number, lease.routing)
                try:
                    return await self.attempt_on(attempt, route, call, encoded)
                except GatewayError as exc:
                    tally.trace.attempt_ended(f"{exc.status}: {exc.message}")
                    self.drop()
                    suspect = blame.suspect  # (for the log)
                    verdict = blame.failed(url, Failure.of(exc))
                    if isinstance(exc, WorkerFault) and verdict.request_caused:
                        logger.warning("request %s failed on replicas %s and %s (%s): not "
                                       "counted against either", self.request_id, suspect,
                                       url, exc.detail)
                    elif isinstance(exc, WorkerFault):
                        logger.warning("request %s: replica %s failed: %s", self.request_id,
                                       url, exc.detail)
                    judged(gateway, tally, verdict)
                    if not verdict.retry or number == ATTEMPTS \
                            or not gateway.replicas.candidates(deployment, tried):
                        raise
                    gateway.metrics.retries.labels(deployment.name).inc()
        finally:  # the suspect still standing, however the attempts ended
            suspect = blame.settle()
            if suspect is not None:
                judged(gateway, tally, Verdict(suspect, retry=False, request_caused=False))
        raise AssertionError("unreachable")  # the loop returns or raises

    def avoid(self, route: Route, tried: set[str]) -> set[str]:
        """The replicas an attempt does not go to: those tried; for a batch line also those
        past the headroom kept for interactive requests, while another is not."""
        if self.client.batch is None:
            return tried
        replicas, deployment = self.gateway.replicas, route.deployment
        avoid = tried | replicas.crowded(deployment, -replicas.headroom(deployment))
        return avoid if replicas.candidates(deployment, avoid) else tried

    def begin(self, lease: Lease, route: Route, served: Served | None = None) -> Attempt:
        """An attempt on the leased replica (`served`: a stream's, continued there)."""
        served = served or Served(deployment=route.deployment.name,
                                  backend_host=urlsplit(lease.replica.url).netloc,
                                  concurrent=lease.concurrent, started=self.tally.started,
                                  routing=lease.routing)
        worker = ReplicaWorker(lease.replica.url.rstrip("/"), self.gateway.queries)
        self.attempt = Attempt(lease, served, worker)
        return self.attempt

    def drop(self, ended: bool = False) -> None:
        """Give up the current attempt: before retrying elsewhere, or (`ended`) at the
        request's end, when it is the one the request ended on. What it reported goes to the
        Tally; its worker request is closed and its replica given back."""
        attempt, self.attempt = self.attempt, None
        if ended and self.migration is not None:
            self.migration.settle(self)  # a stream's failures, judged (migration.py)
        if attempt is None:
            return
        tally = self.tally
        if attempt.served.usage is not None:
            tally.usage = attempt.served.usage
        if ended:
            tally.replica = attempt.lease.replica.url
            tally.first_token_at = attempt.served.first_token_at
        attempt.close()

    async def attempt_on(self, attempt: Attempt, route: Route, call: Call,
                         encoded: bytes) -> ClientReply:
        worker, served = attempt.worker, attempt.served
        await self.open(attempt, route, await call.prepare(worker, encoded))
        assert attempt.answer is not None
        # The limits' headers (remaining tokens and requests) go on every reply.
        admission = self.tally.admission
        headers = bytes_headers(admission.headers) if admission is not None else []
        headers += route_headers(route)
        if call.stream:
            assert self.migration is not None
            self.migration.framing = framing = call.framing(worker, served)
            stream = await open_stream(attempt.answer, framing, headers, self.request_id,
                                       self.migrate)
            migration = self.migration
            attempt.movable(self.gateway.replicas, lambda: migration.movable(self.gateway))
            return stream
        return await read_plain(attempt.answer, call, worker, served, headers)

    async def migrate(self, exc: GatewayError) -> WorkerAnswer | None:
        """The stream's worker failed mid-stream: migration.py goes on elsewhere, or not."""
        if self.migration is None:
            return None
        return await self.migration.migrate(self, exc)

    async def open(self, attempt: Attempt, route: Route, body: bytes) -> None:
        """Send the request to the attempt's replica. With a LoRA adapter: the replica gets
        it first if it lacks it, and a 404 means it lost it since the last look (it
        restarted): it is loaded again and the request sent once more."""
        gateway, lora, url = self.gateway, route.lora, attempt.worker.url
        target = url + self.api.worker_path
        headers = {"x-request-id": self.request_id}
        self.tally.trace.propagate(headers)
        if lora is not None:
            await gateway.adapters.ensure(url, lora)
        try:
            try:
                attempt.answer = await gateway.workers.open(target, body, headers)
            except WorkerFault as exc:
                if lora is None or exc.worker_status != 404:
                    raise
                gateway.adapters.forget(url, lora)
                await gateway.adapters.ensure(url, lora)
                attempt.answer = await gateway.workers.open(target, body, headers)
        except GatewayError as exc:
            if not exc.replica_fault:  # the worker judged the request: its message goes out
                await name_the_asked_model(exc, route, attempt.worker)
            raise


def generation_bound(call: Call, route: Route) -> int:
    """The most the request generates on the route's deployment: max_tokens per sequence,
    and no choice past the context length, whatever max_tokens says."""
    context = route.deployment.context_length or call.max_tokens
    return min(call.max_tokens, context) * call.sequences


def bounded(call: Call, settings: Settings) -> bytes:
    """The worker request encoded, within the bounds every API shares: a translation may
    amplify a small body (batched prompts times n, templates), so what reaches the workers
    is bounded here, after it, whatever the API."""
    if call.sequences > settings.max_sequences:
        raise GatewayError(400, f"The request asks for {call.sequences} sequences (prompts "
                                f"or inputs, times n); at most {settings.max_sequences} are "
                                "allowed in one request")
    try:
        encoded = orjson.dumps(call.body)
    except orjson.JSONEncodeError as exc:  # e.g. nesting deeper than 254 levels
        raise GatewayError(400, "The request cannot be encoded: it nests too "
                                "deeply") from exc
    if len(encoded) > settings.max_body_bytes:
        raise GatewayError(413, f"The request as sent to the workers would be {len(encoded)} "
                                f"bytes, past the limit of {settings.max_body_bytes}")
    return encoded


async def name_the_asked_model(exc: GatewayError, route: Route, worker: ReplicaWorker) -> None:
    """A worker's message names the model as the worker serves it (`smollm2 is not a
    multimodal model`): the client reads the model it asked for instead."""
    lora = route.lora
    try:
        names = [lora.worker_name] if lora is not None else []
        names.append(await worker.served_model())
    except GatewayError:  # the name is unknown: the message stays as the worker said it
        pass
    for name in names:
        if name:  # the whole name only, not a part of a longer one
            exc.message = re.sub(rf"(?<![\w./-]){re.escape(name)}(?![\w./-])",
                                 route.requested_model, exc.message)
