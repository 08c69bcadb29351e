"""The gateway application: wiring of settings, registry store, limits, usage, health,
workers and routes."""

from __future__ import annotations

import functools
import gc
import logging
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import redis.asyncio as aioredis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp

from gateway.anthropic.api import CountTokensApi, MessagesApi
from gateway.api import InferenceApi
from gateway.background import cancel, every
from gateway.batch.engine import Engine
from gateway.batch.files import FileStore
from gateway.batch.fireworks_routes import router as fireworks_batch_router
from gateway.batch.http import BatchParts
from gateway.batch.jobs import Jobs
from gateway.batch.openai_routes import router as openai_batch_router
from gateway.batch.runner import Runner
from gateway.config import Settings
from gateway.controlplane.admin import AdminParts
from gateway.controlplane.admin import router as admin_router
from gateway.controlplane.admin_traffic import router as admin_traffic_router
from gateway.controlplane.budgets import Budget
from gateway.controlplane.limits import BudgetReport, Limiter, LocalLimiter
from gateway.controlplane.redis_ledger import RedisLedger
from gateway.controlplane.redis_limits import RedisLimiter
from gateway.controlplane.redis_memory import MemoryWatch
from gateway.controlplane.registry import Deployment, load_yaml
from gateway.controlplane.responses import LocalResponses, RedisResponses, ResponseStore
from gateway.controlplane.store import RedisStore, RegistryStore, YamlStore
from gateway.controlplane.usage import Backlog, Ledger, LocalLedger
from gateway.dataplane.adapters import Adapters
from gateway.dataplane.discovery import Discovery, make_resolver
from gateway.dataplane.health import HealthChecker, ReplicaHealth
from gateway.dataplane.kv_events import KvEvents, endpoints
from gateway.dataplane.kv_index import BlockIndex
from gateway.dataplane.parts import Gateway
from gateway.dataplane.queries import WorkerQueries
from gateway.dataplane.queue import Queues
from gateway.dataplane.read_routes import router as read_router
from gateway.dataplane.replicas import AffinityOrLeastOutstanding, ReplicaSet
from gateway.dataplane.request import serve
from gateway.dataplane.workers import WorkerClient
from gateway.errors import GatewayError
from gateway.fireworks.chat import ChatApi
from gateway.fireworks.completions import CompletionsApi
from gateway.fireworks.embeddings import EmbeddingsApi
from gateway.fireworks.rerank import RerankApi
from gateway.fireworks.responses import ResponsesApi
from gateway.metrics import GatewayMetrics
from gateway.server.asgi import Edge, GatewayApp, InferenceRoutes, RequestIdMiddleware
from gateway.server.client import Serve
from gateway.tracing import tracing_from_env
from gateway.validation import validation_message

logger = logging.getLogger("gateway")

# Every inference route is served under each of these (the doubled forms are what
# the SDKs produce from common base URLs).
PREFIXES = ("/inference/v1", "/v1", "/inference/v1/v1", "/v1/v1")


def inference_apis(responses: ResponseStore) -> tuple[InferenceApi[Any], ...]:
    """The route table: every inference API the gateway serves, one object each
    (gateway/api.py)."""
    return (ChatApi(), CompletionsApi(), EmbeddingsApi(), MessagesApi(), CountTokensApi(),
            ResponsesApi(responses), RerankApi())


def _error_response(request: Request, error: GatewayError) -> Response:
    request_id = getattr(request.state, "request_id", None)
    if error.status >= 500:
        logger.warning("request %s failed: %s %s", request_id, error.status, error.message)
    return Response(orjson.dumps(error.envelope(request_id)), status_code=error.status,
                    media_type="application/json", headers=error.headers)


def _batch(settings: Settings, bulk: aioredis.Redis) -> BatchParts:
    """Batch inference's parts: files on the volume, jobs in the bulk Redis."""
    root = settings.batch_dir or Path(tempfile.gettempdir()) / "fwgw-batch"
    files = FileStore(bulk, settings.redis_prefix, root,
                      file_max=settings.batch_file_max_bytes,
                      account_max=settings.batch_account_max_bytes)
    engine = Engine(Jobs(bulk, settings.redis_prefix), files,
                    max_lines=settings.batch_file_max_lines,
                    max_jobs=settings.batch_account_max_jobs,
                    prefix_chars=settings.batch_prefix_chars,
                    claim_ms=int(settings.batch_claim_timeout * 1000))
    return BatchParts(engine, files)


def _build(settings: Settings) -> tuple[Gateway, dict[str, aioredis.Redis]]:
    metrics = GatewayMetrics()

    def on_health(url: str, healthy: bool | None) -> None:
        if healthy is None:
            metrics.replica_healthy.remove(url)
        else:
            metrics.replica_healthy.labels(url).set(1 if healthy else 0)

    public = tuple(settings.public_accounts)
    instances: dict[str, aioredis.Redis] = {}  # Redis: "state" (and "bulk" when apart)
    store: RegistryStore
    limiter: Limiter
    ledger: Ledger
    responses: ResponseStore
    if settings.redis_url:
        client = _redis(settings.redis_url, settings)
        bulk = _redis(settings.redis_bulk_url, settings) if settings.redis_bulk_url else client
        instances["state"] = client
        if bulk is not client:
            instances["bulk"] = bulk
        store = RedisStore(client, load_yaml(settings.registry_path, settings.keys_path),
                           prefix=settings.redis_prefix,
                           poll_interval=settings.registry_poll_interval,
                           public_accounts=public)
        store.on_problem = lambda problem: metrics.registry_invalid.set(problem is not None)
        limiter = RedisLimiter(
            client, settings.redis_prefix,
            degraded=lambda reason, outcome: metrics.limiter_degraded.labels(
                reason, outcome).inc(), report=budget_report(metrics))
        def on_backlog(backlog: Backlog) -> None:
            metrics.usage_pending.set(backlog.records)
            metrics.usage_oldest.set(backlog.oldest_seconds)

        def on_refused(data: str) -> None:
            metrics.redis_refused.labels(data).inc()

        ledger = RedisLedger(bulk, settings.redis_prefix, limiter=limiter,
                             on_backlog=on_backlog,
                             max_length=settings.usage_stream_max_length,
                             marker_ttl=settings.usage_marker_ttl, state=client,
                             on_refused=on_refused)
        responses = RedisResponses(bulk, settings.redis_prefix, settings.responses_ttl,
                                   settings.responses_max_bytes,
                                   settings.responses_per_account,
                                   settings.responses_account_bytes, on_refused)
    else:
        store = YamlStore(settings.registry_path, settings.keys_path, public_accounts=public)
        limiter = LocalLimiter(budget_report(metrics))
        ledger = LocalLedger(limiter)
        responses = LocalResponses(settings.responses_ttl,
                                   max_bytes=settings.responses_max_bytes,
                                   per_account=settings.responses_per_account,
                                   account_bytes=settings.responses_account_bytes)
    workers = WorkerClient(settings.upstream_connect_timeout, settings.upstream_read_timeout,
                           str(settings.upstream_ca_file) if settings.upstream_ca_file else None,
                           settings.worker_api_key)
    discovery = Discovery(
        lambda: [r.url for d in store.current.data.deployments for r in d.replicas],
        make_resolver(settings.dns_server), settings.discovery_interval)
    def saturated_at(deployment: Deployment) -> int:
        own = deployment.queue_replica_load
        return settings.queue_replica_load if own is None else own

    replicas = ReplicaSet(AffinityOrLeastOutstanding(settings.affinity_max_imbalance),
                          ReplicaHealth(settings.eject_after_failures, on_health,
                                        settings.ejection_seconds), discovery.expand,
                          settings.max_ejection_percent,
                          lambda deployment: metrics.panics.labels(deployment.name).inc(),
                          lambda: queues.dispatch_all(), saturated_at,
                          settings.batch_headroom)
    replicas.health.on_eject = replicas.move_streams  # its streams go on elsewhere
    queues = Queues(replicas.room, metrics, settings.queue_max_length, settings.queue_timeout,
                    settings.queue_reserve, replicas.headroom)
    adapters = Adapters(workers, lambda: store.current.data, replicas)
    gateway = Gateway(settings=settings, store=store, replicas=replicas, limiter=limiter,
                      ledger=ledger, metrics=metrics, workers=workers,
                      queries=WorkerQueries(workers), discovery=discovery,
                      adapters=adapters, queues=queues, responses=responses,
                      kv_index=BlockIndex(), started_at=time.time(),
                      tracing=tracing_from_env())
    return gateway, instances


def budget_report(metrics: GatewayMetrics) -> BudgetReport:
    """Budgets' outcomes as metrics; what a shadow budget would have refused also in the
    log, once a minute per account and budget."""
    logged: dict[tuple[str, str], float] = {}

    def report(account: str, budget: Budget, used: int, outcome: str) -> None:
        metrics.budget_spent.labels(account, budget.name, budget.window).set(used)
        if outcome == "admitted":
            return
        metrics.budget_refused.labels(account, budget.name,
                                      "shadow" if outcome == "shadow" else "enforce").inc()
        if outcome == "shadow" and time.monotonic() >= logged.get((account, budget.name), 0):
            if len(logged) > 10_000:
                logged.clear()
            logged[(account, budget.name)] = time.monotonic() + 60
            logger.warning("account %s: budget %s (shadow) would refuse requests: %d of %d "
                           "tokens spent this %s", account, budget.name, used, budget.tokens,
                           budget.window)

    return report


def _redis(url: str, settings: Settings) -> aioredis.Redis:
    # Short timeouts: a Redis outage must cost requests milliseconds, not seconds.
    return aioredis.from_url(url, socket_connect_timeout=0.5, socket_timeout=1.0,
                             **({"password": settings.redis_password}
                                if settings.redis_password else {}))


def configure_logging(level: str) -> None:
    """The gateway's own loggers (`gateway.*`: usage lines without Redis, replica health,
    worker faults) to stderr; uvicorn configures only its own."""
    root = logging.getLogger("gateway")
    root.setLevel(level.upper())
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
        root.propagate = False


def create_app(settings: Settings | None = None,
               apis: Callable[[ResponseStore], Iterable[InferenceApi[Any]]] = inference_apis
               ) -> ASGIApp:
    """The gateway: the inference endpoints (one per API that `apis` gives) in front of the
    FastAPI app for the rest."""
    settings = settings or Settings()
    gateway, redis_instances = _build(settings)
    bulk = redis_instances.get("bulk", redis_instances.get("state"))
    batch = _batch(settings, bulk) if bulk is not None else None
    api_table = tuple(apis(gateway.responses))
    runner = None if batch is None else Runner(
        gateway, batch.engine, {api.path: api for api in api_table}, PREFIXES[0])

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await gateway.store.start()
        await gateway.limiter.start()
        await gateway.ledger.start()
        try:  # the first answer before the first request; then every discovery_interval
            await gateway.discovery.resolve_all()
        except Exception:
            logger.exception("replica discovery at start-up failed")
        gateway.discovery.start()
        gateway.adapters.start()
        def listed() -> set[str]:  # every replica, pods found through DNS included
            return {r.url for d in gateway.store.current.data.deployments
                    for r in gateway.replicas.replicas(d)}

        def checked() -> set[str]:
            # ... and those still holding streams that could move (a pod that left DNS to
            # terminate): their health says when to move them.
            return listed() | {url for url, moves in gateway.replicas.streams.items() if moves}

        async def prune() -> None:
            gateway.workers.prune(listed())
            draining = {r.url for d in gateway.store.current.data.deployments
                        for r in gateway.replicas.replicas(d) if r.draining}
            gateway.replicas.move_drained(draining, settings.drain_seconds)

        # Pooled connections to replicas that left (and idle ones past their time) close;
        # streams still on a replica drained drain_seconds ago move.
        pruning = every(max(settings.discovery_interval, 1.0), prune, "connection pruning",
                        logger)
        def after_checks() -> None:
            gateway.metrics.loads_read(gateway.replicas.load.read())
            gateway.queues.dispatch_all()  # new load readings may free room

        checker = HealthChecker(
            gateway.replicas.health, checked, gateway.workers.get, settings.health_check_interval,
            settings.health_check_timeout,
            gateway.replicas.load if settings.load_from_workers else None, after=after_checks)
        if settings.health_check_interval > 0:
            checker.start()

        def publishing() -> dict[str, tuple[str, str]]:  # pods that publish KV events
            found = {}
            for deployment in gateway.store.current.data.deployments:
                for replica in gateway.replicas.replicas(deployment):
                    where = endpoints(deployment, replica)
                    if where is not None:
                        found[replica.url] = where
            return found

        kv_events = KvEvents(gateway.kv_index, publishing, settings.discovery_interval)
        kv_events.start()
        watching = every(settings.redis_memory_interval,
                         MemoryWatch(redis_instances, gateway.metrics.redis_seen).check,
                         "Redis memory watch", logger) if redis_instances else None
        if runner is not None:
            runner.start()
        # What was loaded at start-up lives as long as the process: keep it out of the
        # collector's way, so that full collections under load stay short.
        gc.freeze()
        try:
            yield
        finally:
            if runner is not None:  # lines running finish first, and their records go out
                await runner.stop()
            await checker.stop()
            await kv_events.stop()
            await cancel(pruning)
            await gateway.discovery.stop()
            await gateway.adapters.stop()
            await gateway.ledger.stop()
            await gateway.limiter.stop()
            await gateway.store.stop()
            await gateway.workers.aclose()
            gateway.tracing.shutdown()  # the spans still batched are sent
            await cancel(watching)
            for client in redis_instances.values():
                await client.aclose()
            gateway.metrics.close()

    app = FastAPI(title="Fireworks-compatible gateway", lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    app.state.gateway = gateway
    app.state.admin = AdminParts(gateway.store, gateway.ledger, gateway.adapters,
                                  gateway.limiter)
    app.state.batch = batch
    for prefix in PREFIXES:
        app.include_router(read_router, prefix=prefix)
        app.include_router(openai_batch_router, prefix=prefix)
        app.include_router(fireworks_batch_router, prefix=prefix)
    app.include_router(admin_router, prefix="/admin/v1")
    app.include_router(admin_traffic_router, prefix="/admin/v1")

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(gateway.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.exception_handler(GatewayError)
    async def gateway_error(request: Request, exc: GatewayError) -> Response:
        return _error_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        return _error_response(request, GatewayError(400, str(exc)))

    @app.exception_handler(ValidationError)
    async def invalid_data(request: Request, exc: ValidationError) -> Response:
        # Admin changes validated inside handlers (e.g. a PATCH merged into a deployment).
        return _error_response(request, GatewayError(400, validation_message(exc)[0]))

    @app.exception_handler(RedisError)
    async def redis_down(request: Request, exc: RedisError) -> Response:
        # Only admin changes and usage reads wait on Redis; requests never do. Where Redis
        # is (host, port) goes to the log, not to the client.
        logger.warning("admin request failed, Redis unreachable: %r", exc)
        return _error_response(request, GatewayError(
            503, "The shared state store (Redis) is unreachable; retry",
            headers={"retry-after": "1"}))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        message = {404: "Not found", 405: "Method not allowed"}.get(exc.status_code,
                                                                   str(exc.detail))
        return _error_response(request, GatewayError(exc.status_code, message))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        logger.exception("unhandled error")
        return _error_response(request, GatewayError(500, "Internal error"))

    # The route table: each API under every prefix, served by the data plane.
    direct: dict[str, Serve] = {prefix + api.path: functools.partial(serve, gateway, api)
                                for api in api_table for prefix in PREFIXES}
    routes = InferenceRoutes(Edge(app, settings), direct, settings.client_write_timeout)
    return GatewayApp(RequestIdMiddleware(routes), app, settings, direct)


def serve_app() -> ASGIApp:
    """The app as a server process runs it (uvicorn's factory): logging set up first."""
    settings = Settings()
    configure_logging(settings.log_level)
    return create_app(settings)


