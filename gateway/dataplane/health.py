"""Replica health, as this gateway sees it.

Two sources: an active check (GET <replica>/health every `interval` seconds, for every
replica in the registry) and passive evidence from real requests. A replica is ejected after
`eject_after` consecutive failures of either kind, and readmitted by the first active check
that passes, or by a trial request: `ejection_seconds` after its ejection, an ejected replica
gets one request again (as Envoy's outlier detection does), so that with active checks off
(interval 0) a replica is not ejected forever. Each gateway keeps its own view; they agree
because they watch the same replicas.

What a request causes is not the replica's failure: a worker's failed answer counts
(dataplane/blame.py) only once another replica has answered the same request well (or
could not be asked), never when a second replica's answer fails too. And ejection is capped per
deployment (replicas.py): a client cannot take a deployment away from the others.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from gateway.background import cancel, every
from gateway.dataplane.load import ReplicaLoad, parse_load

logger = logging.getLogger("gateway.health")


@dataclass
class ReplicaState:
    healthy: bool = True  # optimistic: a new replica gets traffic until evidence says no
    failures: int = 0  # consecutive
    ejected_at: float = 0.0  # when it was ejected, or last given a trial request


class ReplicaHealth:
    def __init__(self, eject_after: int = 2,
                 on_change: Callable[[str, bool | None], None] | None = None,
                 ejection_seconds: float = 30.0) -> None:
        # on_change(url, healthy); healthy None: the replica left the registry
        self.eject_after = eject_after
        self.ejection_seconds = ejection_seconds
        self.states: dict[str, ReplicaState] = {}
        self._on_change = on_change
        # Told once as a replica is ejected (its streams move: ReplicaSet.move_streams).
        self.on_eject: Callable[[str], None] = lambda url: None

    def is_healthy(self, url: str) -> bool:
        state = self.states.get(url)
        return state is None or state.healthy

    def ejected_at(self, url: str) -> float:
        state = self.states.get(url)
        return 0.0 if state is None else state.ejected_at

    def trial_due(self, url: str) -> bool:
        """Ejected long enough ago for one trial request."""
        state = self.states.get(url)
        return state is not None and not state.healthy and \
            time.monotonic() - state.ejected_at >= self.ejection_seconds

    def start_trial(self, url: str) -> None:
        """The trial's success readmits the replica (success()); its failure waits again."""
        state = self.states.setdefault(url, ReplicaState())
        state.ejected_at = time.monotonic()

    def success(self, url: str) -> None:
        state = self.states.get(url)
        if state is not None and state.healthy and not state.failures:
            return  # the common case, once per request: nothing changes
        state = self.states.setdefault(url, ReplicaState())
        state.failures = 0
        self._set(url, state, True)

    def failure(self, url: str) -> None:
        state = self.states.setdefault(url, ReplicaState())
        state.failures += 1
        if state.failures >= self.eject_after:
            self._set(url, state, False)

    def _set(self, url: str, state: ReplicaState, healthy: bool) -> None:
        ejected = state.healthy and not healthy
        if state.healthy != healthy:
            logger.warning("replica %s %s", url, "readmitted" if healthy else "ejected")
            if not healthy:
                state.ejected_at = time.monotonic()
        state.healthy = healthy
        if self._on_change is not None:
            self._on_change(url, healthy)
        if ejected:
            self.on_eject(url)

    def forget_except(self, urls: set[str]) -> None:
        for url in set(self.states) - urls:
            del self.states[url]
            if self._on_change is not None:
                self._on_change(url, None)


Get = Callable[[str, float], Awaitable[tuple[int, bytes] | None]]


class HealthChecker:
    """The active half: probes every replica the registry lists, concurrently, and reads
    each healthy one's load from its metrics (when `load` is given)."""

    def __init__(self, health: ReplicaHealth, replica_urls: Callable[[], Iterable[str]],
                 get: Get, interval: float = 1.0, timeout: float = 1.0,
                 load: ReplicaLoad | None = None,
                 after: Callable[[], None] = lambda: None) -> None:
        self.health = health
        self.replica_urls = replica_urls
        self.get = get  # get(url, timeout) -> (status, body), or None when unreachable
        self.interval = interval
        self.timeout = timeout
        self.load = load
        self.after = after  # called after each round of checks
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = every(self.interval, self.check_all, "health checks", logger)

    async def stop(self) -> None:
        await cancel(self._task)

    async def check_all(self) -> None:
        urls = set(self.replica_urls())
        self.health.forget_except(urls)
        if self.load is not None:
            self.load.forget_except(urls)
        await asyncio.gather(*(self._check(url) for url in urls))
        self.after()

    async def _check(self, url: str) -> None:
        base = url.rstrip("/")
        try:
            answer = await self.get(base + "/health", self.timeout)
            healthy = answer is not None and answer[0] == 200
            if healthy and self.load is not None:
                metrics = await self.get(base + "/metrics", self.timeout)
                load = parse_load(metrics[1].decode("utf-8", "replace")) \
                    if metrics is not None and metrics[0] == 200 else None
                if load is not None:
                    self.load.record(url, load)
        except Exception:
            logger.exception("health check of %s failed", url)
            healthy = False
        if healthy:
            self.health.success(url)
        else:
            self.health.failure(url)


