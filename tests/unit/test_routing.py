from __future__ import annotations

from collections import Counter

import pytest

from gateway.controlplane.registry import Deployment, Replica
from gateway.dataplane.health import ReplicaHealth
from gateway.dataplane.replicas import AffinityOrLeastOutstanding, ReplicaSet, rendezvous_rank
from gateway.errors import GatewayError

URLS = [f"http://r{n}" for n in range(1, 5)]
DEPLOYMENT = Deployment(id="d", account="a", model="accounts/a/models/m",
                        replicas=[Replica(url=u) for u in URLS[:2]])
WIDE = DEPLOYMENT.model_copy(update={"replicas": [Replica(url=u) for u in URLS]})


def test_least_outstanding_spreads_and_releases_once() -> None:
    replicas = ReplicaSet()
    first, second, third = (replicas.acquire(DEPLOYMENT) for _ in range(3))
    assert [first.replica.url, second.replica.url, third.replica.url] == \
        ["http://r1", "http://r2", "http://r1"]
    assert (first.concurrent, second.concurrent, third.concurrent) == (1, 1, 2)
    first.release()
    first.release()  # a stream's end and its disconnect may both release
    assert replicas.outstanding["http://r1"] == 1
    assert replicas.acquire(DEPLOYMENT).replica.url == "http://r1"


def test_affinity_is_the_same_in_every_gateway_and_sticks() -> None:
    gateways = [ReplicaSet() for _ in range(3)]
    for key in (f"session-{n}" for n in range(50)):
        chosen = {g.acquire(WIDE, key).replica.url for g in gateways}
        assert len(chosen) == 1  # no shared state, same answer
    # Keys spread over the replicas rather than piling onto one.
    spread = Counter(rendezvous_rank(f"k{n}", WIDE.replicas)[0].url for n in range(400))
    assert len(spread) == 4 and min(spread.values()) > 50


def test_removing_a_replica_moves_only_its_keys() -> None:
    keys = [f"k{n}" for n in range(300)]
    before = {k: rendezvous_rank(k, WIDE.replicas)[0].url for k in keys}
    after = {k: rendezvous_rank(k, WIDE.replicas[1:])[0].url for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert moved and all(before[k] == URLS[0] for k in moved)


def test_affinity_falls_back_when_preferred_is_unhealthy_or_overloaded() -> None:
    health = ReplicaHealth(eject_after=2)
    replicas = ReplicaSet(AffinityOrLeastOutstanding(max_imbalance=2), health)
    preferred = rendezvous_rank("s", WIDE.replicas)[0].url
    leases = [replicas.acquire(WIDE, "s") for _ in range(3)]
    assert {lease.replica.url for lease in leases} == {preferred}  # 3 - 0 > 2 not yet
    assert replicas.acquire(WIDE, "s").replica.url != preferred  # now overloaded
    health.failure(preferred)
    assert health.is_healthy(preferred)  # one failure is not enough
    health.failure(preferred)
    assert not health.is_healthy(preferred)
    for lease in leases:
        lease.release()
    assert replicas.acquire(WIDE, "s").replica.url != preferred
    health.success(preferred)  # the active check passes again: readmitted
    assert replicas.acquire(WIDE, "s").replica.url == preferred


def test_no_healthy_replica_is_a_503_with_retry_after() -> None:
    health = ReplicaHealth(eject_after=1)
    replicas = ReplicaSet(health=health)
    for url in URLS[:2]:
        health.failure(url)
    with pytest.raises(GatewayError) as info:
        replicas.acquire(DEPLOYMENT)
    assert info.value.status == 503 and info.value.headers["retry-after"] == "1"
    with pytest.raises(GatewayError):
        ReplicaSet().acquire(DEPLOYMENT, exclude=set(URLS[:2]))  # both already tried
