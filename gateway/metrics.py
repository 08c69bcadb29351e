"""Prometheus metrics under the gateway's own prefix, `fwgw_` (vLLM's are `vllm:`).

Labels are bounded: deployments are the registry's (requests that resolve to none use
`deployment=""`), codes are HTTP statuses, replicas are the registry's URLs, and rate-limit
rejections are counted by the kind of limit, not by account.

With several server processes (`GATEWAY_WORKERS` > 1) every process writes its values to
files in PROMETHEUS_MULTIPROC_DIR (the `serve` command makes one), and a scrape of any
process sums them all (prometheus_client's multiprocess mode): counters and histograms add
up, gauges of things in flight or waiting add up over the live processes, and the replica
health gauge shows the lowest of the live processes' views (0 when one has it ejected).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Generic, Literal, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from gateway.controlplane.redis_memory import Memory

PREFIX = "fwgw"
MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"  # set: values are shared by the processes
GaugeMode = Literal["livesum", "livemin", "livemax"]
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


M = TypeVar("M", bound=MetricWrapperBase)


class Labelled(Generic[M]):
    """A metric whose labelled children are looked up once: prometheus_client's labels()
    validates and takes a lock on every call, a visible share of a request's CPU."""

    def __init__(self, metric: M) -> None:
        self.metric = metric
        self.children: dict[tuple[str, ...], M] = {}

    def labels(self, *values: str) -> M:
        child = self.children.get(values)
        if child is None:
            child = self.children[values] = self.metric.labels(*values)
        return child

    def remove(self, *values: str) -> None:
        self.children.pop(values, None)
        self.metric.remove(*values)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.shared_dir = os.environ.get(MULTIPROCESS_DIR) or None

        def counter(name: str, doc: str, *labels: str) -> Labelled[Counter]:
            return Labelled(Counter(f"{PREFIX}_{name}", doc, labels, registry=r))

        def gauge(name: str, doc: str, *labels: str,
                  mode: GaugeMode = "livesum") -> Labelled[Gauge]:
            return Labelled(Gauge(f"{PREFIX}_{name}", doc, labels, registry=r,
                                  multiprocess_mode=mode))

        def histogram(name: str, doc: str, *labels: str) -> Labelled[Histogram]:
            return Labelled(Histogram(f"{PREFIX}_{name}", doc, labels, registry=r,
                                      buckets=LATENCY_BUCKETS))

        self.requests = counter("requests", "Inference requests by final status",
                                "deployment", "endpoint", "code")
        self.errors = counter("errors", "Failed inference requests by status code",
                              "deployment", "code")
        self.time_to_first_token = histogram("time_to_first_token_seconds",
                                             "Time to the first token", "deployment")
        self.latency = histogram("request_duration_seconds", "End-to-end request latency",
                                 "deployment")
        self.tokens = counter("tokens", "Tokens by kind (prompt, cached, completion)",
                              "deployment", "kind")
        self.retries = counter("retries", "Requests retried on another replica", "deployment")
        self.request_caused = counter(
            "request_caused_failures", "Requests whose answers failed on two replicas: "
            "counted against neither replica's health", "deployment")
        self.queue_length = gauge("queue_length", "Requests waiting in the gateway's queue",
                                  "deployment", "priority")
        self.queue_wait = histogram("queue_wait_seconds", "Time requests waited in the "
                                    "gateway's queue", "deployment", "priority")
        self.shed = counter("shed", "Requests shed by the gateway's queue (full, or waited "
                            "too long)", "deployment", "priority", "reason")
        self.panics = counter("panic_mode_entries", "Times every replica of a deployment was "
                              "ejected and requests went to all of them", "deployment")
        self.replica_healthy = gauge("replica_healthy",
                                     "1 when the replica takes traffic, 0 when ejected",
                                     "replica", mode="livemin")
        self.replica_load = gauge(
            "replica_load", "Requests running and waiting on the replica, as its worker last "
            "reported them, plus this process's own since: what load-based choices read "
            "(the highest of the live processes' views)", "replica", mode="livemax")
        self.rate_limited = counter("rate_limit_rejections", "Requests refused by a rate limit",
                                    "deployment", "limit")
        self.fallbacks = counter(
            "fallbacks", "Requests passed from a target (deployment or router) to its next "
            "fallback before any byte was sent, by why", "target", "reason")
        self.budget_spent = gauge(
            "budget_spent_tokens", "Tokens an account's budget has spent in its current "
            "window (reservations in flight included), as the latest admission saw it",
            "account", "budget", "window", mode="livemax")
        self.budget_refused = counter(
            "budget_refusals", "Requests a budget refused (mode enforce) or would have "
            "refused (mode shadow)", "account", "budget", "mode")
        self.limiter_degraded = counter(
            "limiter_degraded", "Admissions whose rate limits could not be checked in Redis, "
            "by reason and what was done (admitted or refused)", "reason", "outcome")
        self.registry_invalid = Gauge(
            f"{PREFIX}_registry_invalid", "1 while the registry stored in Redis does not "
            "validate and the last good copy is served", registry=r,
            multiprocess_mode="livemax")
        self.in_flight = gauge("requests_in_flight", "Requests being served", "deployment")
        self.usage_pending = Gauge(
            f"{PREFIX}_usage_records_pending", "Usage records not yet written to Redis",
            registry=r, multiprocess_mode="livesum")
        self.usage_oldest = Gauge(
            f"{PREFIX}_usage_oldest_pending_seconds", "Age of the oldest usage record not "
            "yet written to Redis (0 when none waits)", registry=r,
            multiprocess_mode="livemax")

        self.stream_migrations = counter(
            "stream_migrations", "Streams whose worker failed mid-stream, by what followed: "
            "continued on another replica, failed there, or not continued (declined: the "
            "feature that stops it, no replica, limit)", "deployment", "outcome")
        self.redis_refused = counter(
            "redis_refused_writes", "Writes Redis refused at its memory bound (maxmemory), by "
            "what was written: usage (a batch of records, sent again until taken), limits "
            "(a batch of settlements, the same), responses (a response, not stored)", "data")
        self.redis_used = gauge("redis_memory_used_bytes", "Memory each Redis instance uses "
                                "(state: registry and limits; bulk: usage and responses)",
                                "instance", mode="livemax")
        self.redis_bound = gauge("redis_memory_max_bytes", "Each Redis instance's maxmemory "
                                 "(0: unbounded)", "instance", mode="livemax")
        self.redis_evicted = counter("redis_evicted_keys", "Keys a Redis instance evicted "
                                     "at its memory bound, as this process saw them",
                                     "instance")

    def redis_seen(self, instance: str, memory: Memory, evicted: int) -> None:
        self.redis_used.labels(instance).set(memory.used)
        self.redis_bound.labels(instance).set(memory.bound)
        if evicted:
            self.redis_evicted.labels(instance).inc(evicted)

    def loads_read(self, loads: Mapping[str, int]) -> None:
        """After a round of health checks: each replica's load with a fresh reading; a
        replica without one leaves the gauge."""
        for (url,) in [key for key in self.replica_load.children if key[0] not in loads]:
            self.replica_load.remove(url)
        for url, load in loads.items():
            self.replica_load.labels(url).set(load)

    def render(self) -> bytes:
        if self.shared_dir is None:
            return generate_latest(self.registry)
        every_process = CollectorRegistry()
        MultiProcessCollector(every_process, path=self.shared_dir)  # type: ignore[no-untyped-call]
        return generate_latest(every_process)

    def close(self) -> None:
        """At the process's end: its live gauges leave the sums."""
        if self.shared_dir is not None:
            mark_process_dead(os.getpid(), self.shared_dir)  # type: ignore[no-untyped-call]
