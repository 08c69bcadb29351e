"""Prometheus metrics under the gateway's own prefix, `fwgw_` (vLLM's are `vllm:`).

Labels are bounded: deployments are the registry's (requests that resolve to none use
`deployment=""`), codes are HTTP statuses, replicas are the registry's URLs, and rate-limit
rejections are counted by the kind of limit, not by account.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

PREFIX = "fwgw"
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(f"{PREFIX}_requests", "Inference requests by final status",
                                ["deployment", "endpoint", "code"], registry=r)
        self.errors = Counter(f"{PREFIX}_errors", "Failed inference requests by status code",
                              ["deployment", "code"], registry=r)
        self.time_to_first_token = Histogram(
            f"{PREFIX}_time_to_first_token_seconds", "Time to the first token",
            ["deployment"], buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram(f"{PREFIX}_request_duration_seconds",
                                 "End-to-end request latency", ["deployment"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter(f"{PREFIX}_tokens", "Tokens by kind (prompt, cached, completion)",
                              ["deployment", "kind"], registry=r)
        self.retries = Counter(f"{PREFIX}_retries", "Requests retried on another replica",
                               ["deployment"], registry=r)
        self.replica_healthy = Gauge(f"{PREFIX}_replica_healthy",
                                     "1 when the replica takes traffic, 0 when ejected",
                                     ["replica"], registry=r)
        self.rate_limited = Counter(f"{PREFIX}_rate_limit_rejections",
                                    "Requests refused by a rate limit", ["limit"], registry=r)
        self.in_flight = Gauge(f"{PREFIX}_requests_in_flight", "Requests being served",
                               ["deployment"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
