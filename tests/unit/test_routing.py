from __future__ import annotations

from gateway.registry import Deployment, Replica
from gateway.routing import ReplicaSet

DEPLOYMENT = Deployment(id="d", account="a", model="accounts/a/models/m",
                        replicas=[Replica(url="http://r1"), Replica(url="http://r2")])


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
