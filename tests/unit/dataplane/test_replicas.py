"""Replica choice (affinity, least loaded, leases), replica health (ejection, trials, active
checks) and load read from the workers (dataplane/replicas.py, health.py, load.py)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest

from gateway.controlplane.registry import Deployment, Replica
from gateway.dataplane.health import HealthChecker, ReplicaHealth
from gateway.dataplane.load import Reading, WorkerLoad, parse_load
from gateway.dataplane.replicas import AffinityOrLeastOutstanding, ReplicaSet, rendezvous_rank
from gateway.errors import GatewayError
from gateway.metrics import GatewayMetrics

URLS = [f"http://r{n}" for n in range(1, 5)]
DEPLOYMENT = Deployment(id="d", account="a", model="accounts/a/models/m",
                        replicas=[Replica(url=u) for u in URLS[:2]])
WIDE = DEPLOYMENT.model_copy(update={"replicas": [Replica(url=u) for u in URLS]})


def test_least_outstanding_spreads_and_releases_once() -> None:
    replicas = ReplicaSet()
    first, second, third = (replicas.acquire(DEPLOYMENT) for _ in range(3))
    assert {first.replica.url, second.replica.url} == {"http://r1", "http://r2"}
    assert (first.concurrent, second.concurrent, third.concurrent) == (1, 1, 2)
    third.release()
    third.release()  # a stream's end and its disconnect may both release
    assert replicas.outstanding[third.replica.url] == 1
    first.release()
    assert replicas.acquire(DEPLOYMENT).replica.url == first.replica.url


def test_ties_are_broken_at_random() -> None:
    """Idle gateways must not all send their first request to the first listed replica."""
    firsts = Counter(ReplicaSet().acquire(DEPLOYMENT).replica.url for _ in range(400))
    assert set(firsts) == {"http://r1", "http://r2"} and min(firsts.values()) > 120


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


def test_every_replica_tried_is_a_503_with_retry_after() -> None:
    with pytest.raises(GatewayError) as info:
        ReplicaSet().acquire(DEPLOYMENT, exclude=set(URLS[:2]))  # both already tried
    assert info.value.status == 503 and info.value.headers["retry-after"] == "1"


def test_ejection_is_capped_and_none_left_is_panic() -> None:
    health = ReplicaHealth(eject_after=1)
    panics: list[str] = []
    capped = ReplicaSet(health=health)  # 50%: one of the two replicas may be out
    everything = ReplicaSet(health=health, max_ejection_percent=100,
                            on_panic=lambda deployment: panics.append(deployment.name))
    health.failure(URLS[0])
    assert [r.url for r in capped.in_rotation(DEPLOYMENT)] == [URLS[1]]
    health.states[URLS[0]].ejected_at -= 1  # ejected before the other one
    health.failure(URLS[1])
    assert [r.url for r in capped.in_rotation(DEPLOYMENT)] == [URLS[1]]  # the latest stays
    assert {everything.acquire(DEPLOYMENT).replica.url for _ in range(8)} <= set(URLS[:2])
    assert panics == [DEPLOYMENT.name]  # entered once, however many requests
    health.success(URLS[0])
    assert [r.url for r in everything.in_rotation(DEPLOYMENT)] == [URLS[0]]
    assert everything.panicking == set()


def test_an_ejected_replica_gets_one_trial_request_after_the_ejection_time() -> None:
    health = ReplicaHealth(eject_after=1, ejection_seconds=0.05)
    replicas = ReplicaSet(health=health)
    health.failure("http://r1")

    def next_url() -> str:
        lease = replicas.acquire(DEPLOYMENT)
        lease.release()
        return lease.replica.url

    assert {next_url() for _ in range(10)} == {"http://r2"}
    time.sleep(0.06)
    assert next_url() == "http://r1"  # the trial
    assert next_url() == "http://r2"  # one at a time, until the trial is answered
    health.failure("http://r1")  # the trial failed: wait again
    assert next_url() == "http://r2"
    time.sleep(0.06)
    assert next_url() == "http://r1"
    health.success("http://r1")  # the trial passed: back in
    assert {next_url() for _ in range(40)} == {"http://r1", "http://r2"}


async def test_health_checks_outlive_a_probe_that_raises() -> None:
    health = ReplicaHealth(eject_after=1)

    async def get(url: str, timeout: float) -> tuple[int, bytes]:
        if "r1" in url:
            raise ValueError("a URL nobody can parse")
        return 200, b""

    checker = HealthChecker(health, lambda: URLS[:2], get, interval=0.01)
    checker.start()
    await asyncio.sleep(0.1)
    assert checker._task is not None and not checker._task.done()
    await checker.stop()
    assert not health.is_healthy("http://r1") and health.is_healthy("http://r2")


METRICS = """# HELP vllm:num_requests_running Number of requests in model execution batches.
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_waiting{engine="0",model_name="m"} 2.0
vllm:num_requests_waiting_by_reason{engine="0",model_name="m",reason="capacity"} 2.0
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
vllm:num_requests_running{engine="1",model_name="m"} 1.0
"""


def test_worker_metrics_parse_to_a_load() -> None:
    assert parse_load(METRICS) == WorkerLoad(running=4, waiting=2, kv_cache_usage=0.25)
    assert parse_load("# nothing of vLLM here\nother_metric 1\n") is None


def test_least_loaded_counts_the_workers_load_and_what_this_gateway_added() -> None:
    replicas = ReplicaSet()
    replicas.load.record("http://r1", WorkerLoad(running=5, waiting=3, kv_cache_usage=0.5))
    replicas.load.record("http://r2", WorkerLoad(running=1, waiting=0, kv_cache_usage=0.1))
    # r1 is busy with other gateways' requests: r2 takes the next ones until it is as busy
    leases = [replicas.acquire(DEPLOYMENT) for _ in range(7)]
    assert [lease.replica.url for lease in leases].count("http://r2") >= 6
    assert replicas.load.of("http://r2") >= 7  # 1 reported + 6 or 7 of ours since
    # A reading taken now includes our requests: they are not counted twice.
    replicas.load.record("http://r2", WorkerLoad(running=8, waiting=0, kv_cache_usage=0.2))
    assert replicas.load.of("http://r2") == 8


def test_the_load_choices_read_is_a_metric_until_its_reading_is_stale() -> None:
    replicas = ReplicaSet()
    replicas.load.record("http://r1", WorkerLoad(running=3, waiting=1, kv_cache_usage=0.5))
    replicas.load.record("http://r2", WorkerLoad(running=0, waiting=0, kv_cache_usage=0.0))
    lease = replicas.acquire(DEPLOYMENT)  # r2, the idle one: ours counts at once
    metrics = GatewayMetrics()
    metrics.loads_read(replicas.load.read())
    text = metrics.render().decode()
    assert 'fwgw_replica_load{replica="http://r1"} 4.0' in text
    assert 'fwgw_replica_load{replica="http://r2"} 1.0' in text
    lease.release()
    old = replicas.load.readings["http://r1"]
    replicas.load.readings["http://r1"] = Reading(old.load, old.own,
                                                  time.monotonic() - 60)  # no answer since
    metrics.loads_read(replicas.load.read())
    text = metrics.render().decode()
    assert 'replica="http://r1"' not in text
    assert 'fwgw_replica_load{replica="http://r2"} 0.0' in text


def test_affinity_gives_way_to_the_clusters_load() -> None:
    replicas = ReplicaSet(AffinityOrLeastOutstanding(max_imbalance=4))
    key = "session-1"
    preferred = replicas.acquire(DEPLOYMENT, key)
    preferred.release()
    other = next(u for u in ("http://r1", "http://r2") if u != preferred.replica.url)
    replicas.load.record(preferred.replica.url, WorkerLoad(10, 0, 0.9))  # other gateways
    replicas.load.record(other, WorkerLoad(0, 0, 0.0))
    assert replicas.acquire(DEPLOYMENT, key).replica.url == other


def test_a_request_the_queue_lets_go_takes_a_replica_with_room() -> None:
    """Affinity would pick the saturated replica; the queue counted on the other one."""
    replicas = ReplicaSet(AffinityOrLeastOutstanding(max_imbalance=4),
                          saturated_at=lambda deployment: 2)
    preferred = rendezvous_rank("s", replicas.replicas(DEPLOYMENT))[0]
    replicas.outstanding[preferred.url] = 2  # saturated, within affinity's imbalance
    assert replicas.acquire(DEPLOYMENT, "s").replica.url != preferred.url
    assert replicas.room(DEPLOYMENT) == 1  # the saturated one none, the other 2 - 1


def test_a_lease_counts_the_sequences_it_runs_as_load() -> None:
    replicas = ReplicaSet(policy=AffinityOrLeastOutstanding(pick=lambda tied: tied[0]))
    batch = replicas.acquire(DEPLOYMENT, weight=8)
    assert replicas.outstanding[batch.replica.url] == 8 and batch.concurrent == 8
    # The next requests go to the other replicas, until they carry as much.
    others = [replicas.acquire(DEPLOYMENT) for _ in range(3)]
    assert batch.replica.url not in {lease.replica.url for lease in others}
    batch.release()
    assert replicas.outstanding[batch.replica.url] == 0
