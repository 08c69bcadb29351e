"""Replica choice within a deployment. Policies are small swappable classes.

The default, `AffinityOrLeastOutstanding`, sends requests that carry an affinity key
(`x-session-affinity`, `prompt_cache_key` or `user`) to the replica that rendezvous hashing
ranks first for that key among the healthy replicas, so the worker's prefix cache is reused.
Every gateway computes the same ranking from the same replica list, so affinity holds across
gateway replicas with no shared state and no lock. Requests without a key, and keyed requests
whose preferred replica is overloaded, go to the least loaded replica: the requests the
worker itself reports running and waiting, plus what this gateway started since (load.py),
so every gateway sees the cluster's load. Ties are broken at random, so that gateways do not
all pile onto the first listed replica. An ejected replica whose trial is due gets the next
request (health.py).

Ejection is capped per deployment, as Envoy's `max_ejection_percent`: beyond that share of a
deployment's replicas, the replicas ejected last stay in rotation, so health that one
client's requests managed to steer can never take the whole deployment. When no replica is
left at all (a cap of 100%, every replica ejected), requests go to all of them (panic mode)
rather than getting a 503.
"""

from __future__ import annotations

import hashlib
import random
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Protocol

from gateway.controlplane.registry import Deployment, Replica
from gateway.dataplane.health import ReplicaHealth
from gateway.dataplane.kv_index import CacheHint
from gateway.dataplane.load import ReplicaLoad
from gateway.errors import TargetUnavailable


class ReplicaPolicy(Protocol):
    def choose(self, candidates: list[Replica], load: dict[str, int],
               affinity_key: str | None, hint: CacheHint | None = None) -> Replica:
        """`hint`: per replica, the request's prompt blocks its KV cache holds (from the
        workers' events), when known."""
        ...


Pick = Callable[[list[Replica]], Replica]


class LeastOutstanding:
    """The least loaded replica; one of the tied ones at random (`pick`)."""

    def __init__(self, pick: Pick = random.choice) -> None:
        self.pick = pick

    def choose(self, candidates: list[Replica], load: dict[str, int],
               affinity_key: str | None, hint: CacheHint | None = None) -> Replica:
        if len(candidates) == 1:
            return candidates[0]
        low = min(load[r.url] for r in candidates)
        tied = [r for r in candidates if load[r.url] == low]
        return tied[0] if len(tied) == 1 else self.pick(tied)


def rendezvous_rank(key: str, candidates: list[Replica]) -> list[Replica]:
    """Highest-random-weight order of the replicas for one key: removing a replica moves
    only the keys that preferred it."""
    def weight(replica: Replica) -> bytes:
        return hashlib.blake2b(f"{key}\0{replica.url}".encode(), digest_size=8).digest()
    return sorted(candidates, key=weight, reverse=True)


class AffinityOrLeastOutstanding:
    """The replica holding most of the prompt's blocks in its KV cache, when the workers'
    events say (kv_index.py); else the one the affinity key ranks first; else the least
    loaded. The key gives way to load past `max_imbalance`; the cache past that share of
    it which the cache saves: a pod holding the whole prompt (where the least loaded one
    holds none) may carry `max_imbalance` more requests, one holding half of it half that."""

    def __init__(self, max_imbalance: int = 4, pick: Pick = random.choice) -> None:
        # How many more in-flight requests than the least loaded replica the preferred one may
        # have before affinity gives way to load.
        self.max_imbalance = max_imbalance
        self.fallback = LeastOutstanding(pick)

    def choose(self, candidates: list[Replica], load: dict[str, int],
               affinity_key: str | None, hint: CacheHint | None = None) -> Replica:
        least = self.fallback.choose(candidates, load, None)
        if hint is not None and hint.cached:
            # What the pods hold, from their events: the longest cached prefix wins.
            cached = hint.cached
            best = max(candidates, key=lambda r: (cached.get(r.url, 0), -load[r.url]))
            # A request's prefill is roughly what one more request in flight costs: the
            # blocks the best pod saves over the least loaded one buy that share of a bound.
            saved = (cached.get(best.url, 0) - cached.get(least.url, 0)) / max(hint.blocks, 1)
            if cached.get(best.url, 0) and \
                    load[best.url] - load[least.url] <= self.max_imbalance * saved:
                return best
        if affinity_key is None:
            return least
        preferred = rendezvous_rank(affinity_key, candidates)[0]
        if load[preferred.url] - load[least.url] > self.max_imbalance:
            return least
        return preferred


class Lease:
    """One request's hold on a replica; released exactly once (streams outlive handlers)."""

    def __init__(self, replicas: ReplicaSet, replica: Replica,
                 routing: str | None = None, ended: Callable[[], None] | None = None,
                 weight: int = 1) -> None:
        self._replicas = replicas
        self.replica = replica
        self.weight = weight  # the sequences it runs there: its share of the replica's load
        self._held = True
        self.routing = routing  # why this replica, when KV caches had a say
        self._ended = ended  # the request's blocks no longer count as coming to the replica
        # Requests this gateway had in flight on the replica when this one was admitted,
        # this one included (the fireworks-num-concurrent-requests header).
        self.concurrent = replicas.outstanding[replica.url]

    def release(self) -> None:
        if self._held:
            self._held = False
            self._replicas.outstanding[self.replica.url] -= self.weight
            try:
                if self._ended is not None:
                    self._ended()
            finally:
                self._replicas.on_release()


class ReplicaSet:
    """Counts requests in flight per replica and leases one out per request, among the
    healthy replicas not already tried for this request."""

    def __init__(self, policy: ReplicaPolicy | None = None,
                 health: ReplicaHealth | None = None,
                 expand: Callable[[list[Replica]], list[Replica]] = lambda r: r,
                 max_ejection_percent: int = 50,
                 on_panic: Callable[[Deployment], None] = lambda deployment: None,
                 on_release: Callable[[], None] = lambda: None,
                 saturated_at: Callable[[Deployment], int] = lambda deployment: 0,
                 batch_headroom: int = 0) -> None:
        self.policy = policy or AffinityOrLeastOutstanding()
        self.batch_headroom = batch_headroom  # per replica, kept from batch lines
        self.health = health or ReplicaHealth()
        self.max_ejection_percent = max_ejection_percent
        self.on_panic = on_panic  # called when a deployment enters panic mode
        self.panicking: set[str] = set()  # deployments in panic mode
        self.on_release = on_release  # a lease ended: the queue may let a request go
        # The load at which a deployment's replica is saturated (queue.py); 0: never.
        self.saturated_at = saturated_at
        self.expand = expand  # discovered replicas in place of dns+ ones (discovery.py)
        self.outstanding: dict[str, int] = defaultdict(int)  # this gateway's, in flight
        self.load = ReplicaLoad(self.outstanding)
        # The streams on each replica that could go on elsewhere: how to move each
        # (request.py registers them).
        self.streams: dict[str, set[Callable[[], None]]] = defaultdict(set)
        self.draining_since: dict[str, float] = {}  # replicas drained, since (monotonic)

    def move_drained(self, draining: set[str], seconds: float) -> None:
        """Called every second or so with the replicas drained through the admin API: the
        streams still on one drained `seconds` ago move (move_streams)."""
        now = time.monotonic()
        for url in set(self.draining_since) - draining:
            del self.draining_since[url]
        for url in draining:
            if now - self.draining_since.setdefault(url, now) >= seconds:
                self.move_streams(url)

    def move_streams(self, url: str) -> None:
        """The replica failed its health check (vLLM may keep a stream's connection open
        with nothing more to send, e.g. past its drain timeout): its streams that can go on
        elsewhere are cut, and so continued there."""
        for move in list(self.streams.pop(url, ())):
            move()

    def replicas(self, deployment: Deployment) -> list[Replica]:
        return self.expand(deployment.replicas)

    def in_rotation(self, deployment: Deployment) -> list[Replica]:
        """The healthy replicas, and the ejected ones beyond the deployment's ejection cap
        (the latest ejected first); all of them when none is left (panic). Never one that
        is draining."""
        replicas = [r for r in self.replicas(deployment) if not r.draining]
        ejected = [r for r in replicas if not self.health.is_healthy(r.url)]
        if ejected:
            cap = len(replicas) * self.max_ejection_percent // 100
            ejected.sort(key=lambda r: self.health.ejected_at(r.url))
            out = {r.url for r in ejected[:cap]}
            kept = [r for r in replicas if r.url not in out]
            if not kept and replicas:
                if deployment.name not in self.panicking:
                    self.panicking.add(deployment.name)
                    self.on_panic(deployment)
                return replicas
            replicas = kept
        self.panicking.discard(deployment.name)
        return replicas

    def room(self, deployment: Deployment, extra: int = 0) -> int:
        """Requests the replicas in rotation can take before each is saturated (past it by
        `extra`)."""
        limit = self.saturated_at(deployment)
        if not limit:
            return sys.maxsize
        return sum(max(0, limit + extra - self.load.of(r.url))
                   for r in self.in_rotation(deployment))

    def headroom(self, deployment: Deployment) -> int:
        """The load per replica batch lines leave to interactive requests: batch_headroom,
        and at least one request short of saturation (an idle deployment runs them)."""
        return min(self.batch_headroom, max(self.saturated_at(deployment) - 1, 0))

    def crowded(self, deployment: Deployment, extra: int) -> set[str]:
        """The replicas in rotation whose load reached saturation (plus `extra`)."""
        limit = self.saturated_at(deployment)
        if not limit:
            return set()
        return {r.url for r in self.in_rotation(deployment)
                if self.load.of(r.url) >= limit + extra}

    def candidates(self, deployment: Deployment, exclude: set[str]) -> list[Replica]:
        return [r for r in self.in_rotation(deployment) if r.url not in exclude]

    def acquire(self, deployment: Deployment, affinity_key: str | None = None,
                exclude: set[str] | None = None,
                prefer: Callable[[str], bool] | None = None,
                hint: CacheHint | None = None, weight: int = 1) -> Lease:
        """A lease on a replica; among those `prefer` accepts when there are any (e.g. the
        replicas that hold a request's LoRA adapter). `weight`: the sequences the request
        runs, which count as that many requests of the replica's load."""
        exclude = exclude or set()
        hint = None if hint is None else hint.now()
        routing = None  # why, when the pods' KV caches had a say (the fireworks-routing header)
        trial = next((r for r in self.replicas(deployment) if r.url not in exclude
                      and not r.draining and self.health.trial_due(r.url)), None)
        if trial is not None:
            self.health.start_trial(trial.url)
            replica = trial
            routing = None if hint is None else "trial"
        else:
            candidates = self.candidates(deployment, exclude)
            if not candidates:
                raise TargetUnavailable(503, f"No healthy replica for deployment "
                                             f"{deployment.name}", "no_replica",
                                        headers={"retry-after": "1"})
            limit = self.saturated_at(deployment)
            if limit:  # the queue let this request go for a replica with room: that one
                candidates = [r for r in candidates if self.load.of(r.url) < limit] \
                    or candidates
            if prefer is not None:
                candidates = [r for r in candidates if prefer(r.url)] or candidates
            load = {r.url: self.load.of(r.url) for r in candidates}
            replica = self.policy.choose(candidates, load, affinity_key, hint)
            if hint is not None:
                routing = (f"cached-blocks={hint.cached.get(replica.url, 0)}/{hint.blocks}; "
                           f"load={load[replica.url]}")
        self.outstanding[replica.url] += weight
        # A trial's blocks do not draw other requests to a pod that is still on trial.
        ended = None if hint is None or trial is not None else hint.expect(replica.url)
        return Lease(self, replica, routing, ended, weight)
