"""Which deployment serves a request's target, and when its next target takes over.

A model id resolves to Targets (controlplane/registry.py): the deployment or router it names,
then that target's fallbacks. `route_to` makes one target a Route: a deployment as it is, if
it is ready and has a replica in rotation; a router's deployment chosen by the router's
strategy among those that are. `passes_over` says whether a failure hands the request to the
next target: request.py asks only before any byte reached the client, and the answer is yes
only for what this target cannot do and another may (errors.TargetUnavailable): it shed the
request (its queue is full), it is disabled, it has no replica in rotation, or it refuses
the prompt as longer than its context. Never a client's 4xx, a rate limit or a budget, and
never a worker's failure (retried on another replica of the same deployment instead).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from collections.abc import Set as AbstractSet

from gateway.controlplane.registry import Deployment, Registry, Route, Router, Target, Targets
from gateway.dataplane.replicas import ReplicaSet
from gateway.errors import GatewayError, TargetUnavailable, bytes_headers

Members = list[tuple[Deployment, int]]  # a router's deployments, with their weights


def choose(strategy: str, members: Members, load: Callable[[Deployment], float],
           rng: random.Random | None = None) -> Deployment:
    """weighted-random: at random in proportion to the weights; even-load: the deployment
    with the least load per replica (the fewest requests running and waiting), ties at
    random."""
    pick = rng or random
    if strategy == "even-load":
        loads = [(load(deployment), deployment) for deployment, _ in members]
        lowest = min(value for value, _ in loads)
        return pick.choice([deployment for value, deployment in loads if value == lowest])
    return pick.choices([d for d, _ in members], weights=[w for _, w in members])[0]


def load_per_replica(replicas: ReplicaSet, deployment: Deployment) -> float:
    """What a deployment's replicas in rotation carry, on average (dataplane/load.py)."""
    pods = replicas.in_rotation(deployment)
    return sum(replicas.load.of(r.url) for r in pods) / len(pods) if pods else float("inf")


def route_to(target: Target, targets: Targets, registry: Registry, replicas: ReplicaSet,
             fallback: str = "", tried: AbstractSet[str] = frozenset()) -> Route | None:
    """The Route of one target; None when its deployments were all `tried` already (a
    router and one of its deployments may both be named); TargetUnavailable when it can
    serve nothing now."""
    router = target if isinstance(target, Router) else None
    if router is not None:
        existing = registry.deployments_of(router)
        untried = [(d, w) for d, w in existing if d.name not in tried]
        if existing and not untried:
            return None
        ready = [(d, w) for d, w in untried if d.state == "ready"]
        members = [(d, w) for d, w in ready if _any_in_rotation(replicas, d)]
        if not ready:
            raise _unavailable(f"Router {router.name} has no deployment ready", "disabled")
        if not members:
            raise _unavailable(f"Router {router.name} has no replica in rotation", "no_replica")
        deployment = choose(router.strategy, members,
                            lambda d: load_per_replica(replicas, d))
    else:
        assert isinstance(target, Deployment)
        deployment = target
        if deployment.name in tried:
            return None
        if deployment.state != "ready":
            raise _unavailable(f"Deployment {deployment.name} is {deployment.state}",
                               "disabled")
        if not _any_in_rotation(replicas, deployment):
            raise _unavailable(f"Deployment {deployment.name} has no replica in rotation",
                               "no_replica")
    return Route(deployment, targets.requested_model, targets.lora, targets.priority_tier,
                 router=router, fallback=fallback)


def _any_in_rotation(replicas: ReplicaSet, deployment: Deployment) -> bool:
    """ReplicaSet.in_rotation is never empty while a replica is not draining (with every
    one ejected, all take traffic): this says so without judging each one's health."""
    return any(not r.draining for r in replicas.replicas(deployment))


def _unavailable(message: str, reason: str) -> TargetUnavailable:
    return TargetUnavailable(503, message, reason, headers={"retry-after": "1"})


def passes_over(exc: GatewayError) -> str | None:
    """The reason a failure hands the request to the next target; None when it does not."""
    return exc.reason if isinstance(exc, TargetUnavailable) else None


def route_headers(route: Route) -> list[tuple[bytes, bytes]]:
    """What the response says of where it was served, whatever the API: the deployment; the
    router that chose it; the targets passed over, each as `<reason>:<name>`."""
    headers = {"fireworks-deployment": route.deployment.name}
    if route.router is not None:
        headers["fireworks-router"] = route.router.name
    if route.fallback:
        headers["fireworks-fallback"] = route.fallback
    return bytes_headers(headers)
