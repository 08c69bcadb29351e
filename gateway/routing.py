"""Replica choice within a deployment. Policies are small swappable classes."""

from __future__ import annotations

from collections import defaultdict
from typing import Protocol

from gateway.registry import Deployment, Replica


class ReplicaPolicy(Protocol):
    def choose(self, deployment: Deployment, outstanding: dict[str, int]) -> Replica: ...


class LeastOutstanding:
    """The replica with the fewest requests in flight from this gateway; ties go to the
    first listed, so a single replica always gets everything."""

    def choose(self, deployment: Deployment, outstanding: dict[str, int]) -> Replica:
        return min(deployment.replicas, key=lambda r: outstanding[r.url])


class Lease:
    """One request's hold on a replica; released exactly once (streams outlive handlers)."""

    def __init__(self, replicas: ReplicaSet, replica: Replica) -> None:
        self._replicas = replicas
        self.replica = replica
        self._held = True
        # Requests this gateway had in flight on the replica when this one was admitted,
        # this one included (the fireworks-num-concurrent-requests header).
        self.concurrent = replicas.outstanding[replica.url]

    def release(self) -> None:
        if self._held:
            self._held = False
            self._replicas.outstanding[self.replica.url] -= 1


class ReplicaSet:
    """Counts requests in flight per replica and leases one out per request."""

    def __init__(self, policy: ReplicaPolicy | None = None) -> None:
        self.policy = policy or LeastOutstanding()
        self.outstanding: dict[str, int] = defaultdict(int)

    def acquire(self, deployment: Deployment) -> Lease:
        replica = self.policy.choose(deployment, self.outstanding)
        self.outstanding[replica.url] += 1
        return Lease(self, replica)
