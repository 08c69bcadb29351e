"""The parts one gateway process serves inference with (app.state.gateway), built once in
app.py and handed down: settings, the registry store, replicas, limits, usage, metrics,
the worker client, what is kept about workers, stored responses and tracing."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.config import Settings
from gateway.controlplane.limits import Limiter
from gateway.controlplane.responses import ResponseStore
from gateway.controlplane.store import RegistryStore
from gateway.controlplane.usage import Ledger
from gateway.dataplane.adapters import Adapters
from gateway.dataplane.discovery import Discovery
from gateway.dataplane.kv_index import BlockIndex
from gateway.dataplane.queries import WorkerQueries
from gateway.dataplane.queue import Queues
from gateway.dataplane.replicas import ReplicaSet
from gateway.dataplane.workers import WorkerClient
from gateway.metrics import GatewayMetrics
from gateway.tracing import Tracing


@dataclass
class Gateway:
    settings: Settings
    store: RegistryStore
    replicas: ReplicaSet
    limiter: Limiter
    ledger: Ledger
    metrics: GatewayMetrics
    workers: WorkerClient
    queries: WorkerQueries
    discovery: Discovery
    adapters: Adapters
    queues: Queues
    responses: ResponseStore  # stored Responses API responses
    kv_index: BlockIndex  # what each pod holds in its KV cache, from its events
    started_at: float
    tracing: Tracing  # requests' spans (OpenTelemetry), off unless OTEL_* variables say
