"""One validated inference request, whatever its API: admit, attempt on replicas, relay.

The API translates (its Call) -> admit (limits) -> an Exchange that owns the rest -> up to
two attempts: a replica from replicas.py, the worker asked, its answer checked up to its
first token -> on a replica fault before any byte reached the client, once more on another
replica. The Exchange ends the request (exchange.py); routes.py decides how and calls it.
"""

from __future__ import annotations

import logging
import random
import re
import time
from typing import Any

import orjson
from pydantic import BaseModel

from gateway.api import InferenceApi
from gateway.controlplane.limits import Admission, RateLimited
from gateway.controlplane.registry import Account, Route
from gateway.dataplane.exchange import Attempt, Exchange, new_record_id
from gateway.dataplane.kv_index import CacheHint, cache_hint
from gateway.dataplane.parts import Gateway
from gateway.dataplane.queries import ReplicaWorker
from gateway.dataplane.relay import HeldStream, PlainReply, open_stream, read_plain
from gateway.errors import GatewayError, WorkerFault, bytes_headers
from gateway.tracing import NO_TRACE, RequestTrace

logger = logging.getLogger("gateway.serving")
ATTEMPTS = 2  # the first try and one retry on another replica
ClientReply = PlainReply | HeldStream  # what goes back to the client


def count_refusal(gateway: Gateway, deployment: str, endpoint: str, status: int) -> None:
    """Metrics for a request refused before it was admitted (deployment "" when
    unresolved)."""
    gateway.metrics.requests.labels(deployment, endpoint, str(status)).inc()
    gateway.metrics.errors.labels(deployment, str(status)).inc()


async def admit(gateway: Gateway, api: InferenceApi[Any], account: Account, route: Route,
                request: BaseModel, request_id: str, trace: RequestTrace = NO_TRACE
                ) -> Exchange:
    """Translate and admit: the Exchange that owns the request from here on."""
    deployment = route.deployment
    record_id = new_record_id()
    call = api.translate(request, route, gateway.settings, account=account.id,
                         nonce=record_id)
    if route.lora is not None:  # the adapter, by the name its workers know it
        call.body["model"] = route.lora.worker_name
    try:
        encoded = orjson.dumps(call.body)
    except orjson.JSONEncodeError as exc:  # e.g. nesting deeper than 254 levels
        raise GatewayError(400, "The request cannot be encoded: it nests too deeply") from exc
    if gateway.ledger.backlogged:
        raise GatewayError(503, "Usage records cannot be written at the moment; new requests "
                                "are refused until they can", headers={"retry-after": "5"})
    admission = Admission(record_id, account.id)  # unlimited: nothing to reserve
    if account.limits.any():
        try:
            # No choice generates past the context length, whatever max_tokens says.
            generated = min(call.max_tokens, deployment.context_length or call.max_tokens)
            admission = await gateway.limiter.admit(account, api.prompt_estimate(request),
                                                    generated * call.n, record_id)
        except RateLimited as exc:
            gateway.metrics.rate_limited.labels(deployment.name, exc.kind).inc()
            raise
    return Exchange(gateway, account, route, admission, request_id, api.worker_path, call,
                    encoded, trace)


async def attempt_all(exchange: Exchange, affinity: str | None) -> ClientReply:
    """Attempts on replicas until one answers well up to its first token.

    A replica that cannot be reached (refused, reset, timed out) has failed. A replica
    whose answer failed (a 5xx, a malformed answer) may have been given a request that
    fails anywhere: that counts against it only once another replica answered the same
    request well, or could not be asked; if a second replica's answer fails too, the
    request caused it and neither replica is blamed (health.py)."""
    gateway = exchange.gateway
    health = gateway.replicas.health
    deployment, lora = exchange.route.deployment, exchange.route.lora
    prefer = None if lora is None else (lambda url: gateway.adapters.holds(url, lora))
    queued_at = time.monotonic()
    if await gateway.queues.turn(deployment, exchange.account, exchange.call.priority):
        exchange.trace.waited("queue", queued_at)
    hint = await _cache_hint(exchange) if gateway.kv_index.known else None
    tried: set[str] = set()
    answered_badly: str | None = None
    try:
        for attempt_number in range(ATTEMPTS):
            attempt = exchange.begin(gateway.replicas.acquire(deployment, affinity, tried,
                                                              prefer, hint))
            url = attempt.lease.replica.url
            tried.add(url)
            exchange.trace.routed(url, attempt_number + 1, attempt.lease.routing)
            try:
                return await _attempt(exchange, attempt)
            except GatewayError as exc:
                exchange.trace.attempt_ended(f"{exc.status}: {exc.message}")
                exchange.drop()
                if not exc.replica_fault:
                    answered_badly = None  # another replica judged the request itself
                    raise
                if not isinstance(exc, WorkerFault):
                    health.failure(url)
                elif answered_badly is None:
                    logger.warning("request %s: replica %s failed: %s", exchange.request_id,
                                   url, exc.detail)
                    answered_badly = url
                else:  # the same request failed on two replicas: the request's doing
                    logger.warning("request %s failed on replicas %s and %s (%s): not "
                                   "counted against either", exchange.request_id,
                                   answered_badly, url, exc.detail)
                    gateway.metrics.request_caused.labels(deployment.name).inc()
                    answered_badly = None
                    raise
                if attempt_number + 1 == ATTEMPTS or \
                        not gateway.replicas.candidates(deployment, tried):
                    raise
                gateway.metrics.retries.labels(deployment.name).inc()
    finally:
        if answered_badly is not None:
            health.failure(answered_badly)
    raise AssertionError("unreachable")  # the loop returns or raises


async def _cache_hint(exchange: Exchange) -> CacheHint | None:
    """What each pod in rotation holds of the request's prompt, from the pods' KV-cache
    events (kv_index.py); a random one of them tokenizes the prompt when it is text."""
    gateway, lora = exchange.gateway, exchange.route.lora
    pods = [r.url for r in gateway.replicas.in_rotation(exchange.route.deployment)]
    if not pods:
        return None
    tokenizer = ReplicaWorker(random.choice(pods).rstrip("/"), gateway.queries)
    return await cache_hint(gateway.kv_index, pods, exchange.call.cache_query(),
                            None if lora is None else lora.worker_name, tokenizer)


async def _open(exchange: Exchange, attempt: Attempt, body: bytes) -> None:
    """Send the request to the attempt's replica. With a LoRA adapter: the replica gets it
    first if it lacks it, and a 404 means it lost it since the last look (it restarted): it
    is loaded again and the request sent once more."""
    gateway, lora, url = exchange.gateway, exchange.route.lora, attempt.worker.url
    target, headers = url + exchange.endpoint, {"x-request-id": exchange.request_id}
    exchange.trace.propagate(headers)
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
            await _name_the_asked_model(exc, exchange, attempt)
        raise


async def _name_the_asked_model(exc: GatewayError, exchange: Exchange,
                                attempt: Attempt) -> None:
    """A worker's message names the model as the worker serves it (`smollm2 is not a
    multimodal model`): the client reads the model it asked for instead."""
    lora = exchange.route.lora
    try:
        names = [lora.worker_name] if lora is not None else []
        names.append(await attempt.worker.served_model())
    except GatewayError:  # the name is unknown: the message stays as the worker said it
        pass
    for name in names:
        if name:  # the whole name only, not a part of a longer one
            exc.message = re.sub(rf"(?<![\w./-]){re.escape(name)}(?![\w./-])",
                                 exchange.route.requested_model, exc.message)


async def _attempt(exchange: Exchange, attempt: Attempt) -> ClientReply:
    call, worker, served = exchange.call, attempt.worker, attempt.served
    await _open(exchange, attempt, await call.prepare(worker, exchange.encoded))
    assert attempt.answer is not None
    headers = bytes_headers(exchange.admission.headers)
    if call.stream:
        return await open_stream(attempt.answer, call.framing(worker, served), headers,
                                 exchange.request_id)
    return await read_plain(attempt.answer, call, worker, served, headers)
