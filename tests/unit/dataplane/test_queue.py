"""The gateway's queue (dataplane/queue.py): order by priority, fairness across accounts by
weight, bounds in time and length, and the data plane waiting in it while the replicas are
saturated (scripted workers)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from gateway.controlplane.registry import Account, Deployment
from gateway.dataplane.queue import Band, Queues, Waiter
from gateway.errors import GatewayError
from gateway.metrics import GatewayMetrics
from tests.unit.fake_worker import KEY, MODEL, Pause, Stream
from tests.unit.harness import (
    ADMIN,
    COMPLETION,
    OTHER_KEY,
    auth,
    build,
    shared,
)

DEPLOYMENT = Deployment(id="d", account="a", model="accounts/a/models/m")


def waiter(account: str, weight: int = 1) -> Waiter:
    return Waiter(account, weight, (0, 0), asyncio.get_running_loop().create_future())


async def test_accounts_take_turns_by_weight() -> None:
    band = Band()
    for _ in range(6):
        band.push(waiter("flood"))
    band.push(waiter("light"))
    band.push(waiter("light"))
    order = [band.pop().account for _ in range(8)]
    assert order[:4] == ["flood", "light", "flood", "light"]  # not 6 floods first
    weighted = Band()
    for _ in range(6):
        weighted.push(waiter("big", weight=2))
        weighted.push(waiter("small"))
    order = [weighted.pop().account for _ in range(9)]
    assert order.count("big") == 6 and order.count("small") == 3
    flooded = Band()
    for _ in range(6):
        flooded.push(waiter("flood"))
    assert flooded.pop().account == "flood"
    flooded.push(waiter("light"))  # nothing of its own waiting: it goes next
    assert [flooded.pop().account for _ in range(3)] == ["light", "flood", "flood"]


class Room:
    """A deployment with `free` requests of room, as the replicas' load would say."""

    def __init__(self) -> None:
        self.free = 0

    def __call__(self, deployment: Deployment, extra: int) -> int:
        return self.free + extra  # one replica


def account(name: str, priority: int = 0) -> Account:
    return Account(id=name, priority=priority)


async def test_priority_first_then_arrival_and_bounds() -> None:
    room = Room()
    queues = Queues(room, GatewayMetrics(), max_length=3, timeout=5)
    done: list[str] = []

    async def ask(name: str, acct: Account, priority: bool = False) -> None:
        await queues.turn(DEPLOYMENT, acct, priority)
        done.append(name)

    tasks = [asyncio.create_task(ask("a1", account("a"))),
             asyncio.create_task(ask("b1", account("b", priority=5))),
             asyncio.create_task(ask("c1", account("c"), priority=True))]
    await asyncio.sleep(0.01)
    assert done == []  # no room: all three wait
    # Full: a fourth standard request is the lowest newest: shed itself.
    with pytest.raises(GatewayError) as shed:
        await queues.turn(DEPLOYMENT, account("d"), False)
    assert shed.value.status == 503 and shed.value.headers["retry-after"] == "1"
    # A priority-tier request sheds the newest of the lowest priority (a1) instead.
    tasks.append(asyncio.create_task(ask("e1", account("e"), priority=True)))
    await asyncio.sleep(0.01)
    with pytest.raises(GatewayError):
        await tasks[0]
    room.free = 3
    queues.dispatch_all()
    await asyncio.gather(*tasks[1:])
    assert done == ["c1", "e1", "b1"]  # priority tier, then the account's priority


async def test_a_full_queue_sheds_the_flood_not_the_light_account() -> None:
    queues = Queues(Room(), GatewayMetrics(), max_length=4)
    flood = [asyncio.create_task(queues.turn(DEPLOYMENT, account("flood"), False))
             for _ in range(4)]
    await asyncio.sleep(0.01)
    light = asyncio.create_task(queues.turn(DEPLOYMENT, account("light"), False))
    await asyncio.sleep(0.01)
    assert flood[-1].done() and isinstance(flood[-1].exception(), GatewayError)
    assert not light.done()  # waiting, in the flood's newest place
    with pytest.raises(GatewayError):  # the flood's next one sheds itself
        await queues.turn(DEPLOYMENT, account("flood"), False)
    for task in [*flood[:-1], light]:
        task.cancel()
    await asyncio.gather(*flood, light, return_exceptions=True)


async def test_an_account_with_nothing_waiting_takes_the_reserve() -> None:
    room = Room()
    room.free = -1  # saturated, and the one reserved taken
    queues = Queues(room, GatewayMetrics(), reserve=1)
    flood = asyncio.create_task(queues.turn(DEPLOYMENT, account("flood"), False))
    await asyncio.sleep(0.01)
    room.free = 0  # the reserve free again; still saturated
    await asyncio.wait_for(queues.turn(DEPLOYMENT, account("light"), False), 1)  # at once
    second = asyncio.create_task(queues.turn(DEPLOYMENT, account("flood"), False))
    await asyncio.sleep(0.01)
    assert not flood.done() and not second.done()  # it waits behind its own
    for task in (flood, second):
        task.cancel()
    await asyncio.gather(flood, second, return_exceptions=True)


async def test_a_request_waits_no_longer_than_the_timeout() -> None:
    metrics = GatewayMetrics()
    queues = Queues(Room(), metrics, timeout=0.05)
    with pytest.raises(GatewayError) as late:
        await queues.turn(DEPLOYMENT, account("a"), False)
    assert late.value.status == 503 and "0.05 s" in late.value.message
    assert queues.queues[DEPLOYMENT.name].length == 0
    text = metrics.render().decode()
    assert 'fwgw_shed_total{deployment="accounts/a/deployments/d",priority="standard/0",' \
           'reason="timeout"} 1.0' in text


async def test_a_client_that_leaves_leaves_the_queue() -> None:
    queues = Queues(Room(), GatewayMetrics())
    task = asyncio.create_task(queues.turn(DEPLOYMENT, account("a"), False))
    await asyncio.sleep(0.01)
    assert queues.queues[DEPLOYMENT.name].length == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert queues.queues[DEPLOYMENT.name].length == 0


def entitled(urls: dict[str, str], priority_tier: bool = True) -> dict[str, Any]:
    """The shared deployment (with priority scheduling), `other` entitled to the priority
    tier or not."""
    content = shared(urls)
    content["accounts"][1]["priority_tier"] = priority_tier
    content["deployments"][0]["priority_scheduling"] = True
    return content


async def test_saturated_replicas_hold_requests_in_the_gateway(tmp_path: Path) -> None:
    """Two replicas saturated at 1 request each: of 5 requests at once, 2 reach the
    workers; the rest wait in the gateway and go as requests finish, a priority-tier one
    first."""
    at_workers: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        at_workers.append(request.content.decode())
        return httpx.Response(200, headers={"content-type": "application/json"},
                              stream=Stream([Pause(0.5), json.dumps(COMPLETION).encode()]))

    h = build(tmp_path, handler, hosts=("w1", "w2"), registry_of=entitled, listed_order=True,
              admin_key=ADMIN, queue_replica_load=1, load_from_workers=False)
    async with h.running() as client:
        def ask(key: str, prompt: str, **extra: str) -> asyncio.Task[httpx.Response]:
            return asyncio.create_task(client.post(
                "/v1/completions", headers=auth(key),
                json={"model": MODEL, "prompt": prompt} | extra))

        tasks = [ask(KEY, f"standard {n}") for n in range(4)]
        await asyncio.sleep(0.1)
        tasks.append(ask(OTHER_KEY, "urgent", service_tier="priority"))
        await asyncio.sleep(0.2)
        assert len(at_workers) == 2
        metrics = (await client.get("/metrics", headers=auth(ADMIN))).text
        assert 'fwgw_queue_length{deployment="accounts/fireworks/deployments/d",' \
               'priority="standard/0"} 2.0' in metrics
        responses = await asyncio.gather(*tasks)
        metrics = (await client.get("/metrics", headers=auth(ADMIN))).text
    assert [r.status_code for r in responses] == [200] * 5
    assert "urgent" in at_workers[2]  # the first to leave the queue
    assert 'fwgw_queue_wait_seconds_count{deployment="accounts/fireworks/deployments/d",' \
           'priority="standard/0"} 2.0' in metrics


async def test_a_batch_spends_its_accounts_turns_as_the_sequences_it_asks_for() -> None:
    band = Band()
    band.push(Waiter("batch", 1, (0, 0), asyncio.get_running_loop().create_future(), 8))
    for _ in range(3):
        band.push(Waiter("batch", 1, (0, 0), asyncio.get_running_loop().create_future(), 8))
        band.push(waiter("single"))
    order = [band.pop().account for _ in range(6)]
    # One batch of 8 sequences costs the account 8 turns: the single requests all go
    # before its second batch.
    assert order == ["batch", "single", "single", "single", "batch", "batch"]


async def test_a_batch_that_leaves_and_comes_back_still_owes_its_turns() -> None:
    band = Band()
    for _ in range(4):
        band.push(waiter("single"))
    band.push(Waiter("batch", 1, (0, 0), asyncio.get_running_loop().create_future(), 8))
    assert [band.pop().account for _ in range(2)] == ["single", "batch"]  # both new
    band.push(waiter("batch"))  # its flow emptied 7 turns in debt: it comes back owing
    assert [band.pop().account for _ in range(4)] == ["single"] * 3 + ["batch"]
    band.push(Waiter("batch", 1, (0, 0), asyncio.get_running_loop().create_future(), 8))
    assert band.pop().account == "batch"  # alone: no one to be fair to, and no debt kept
    assert band.size == 0 and not band.debts


async def test_a_batch_goes_straight_on_only_with_room_for_all_its_sequences() -> None:
    room = Room()
    queues = Queues(room, GatewayMetrics(), timeout=5, reserve=2)
    room.free = -2  # saturated, the reserve too: a waits
    waiting = asyncio.create_task(queues.turn(DEPLOYMENT, account("a"), False))
    await asyncio.sleep(0)
    room.free = 0  # the reserve has room for 2
    batch = asyncio.create_task(queues.turn(DEPLOYMENT, account("batch"), False, 3))
    single = asyncio.create_task(queues.turn(DEPLOYMENT, account("single"), False))
    await asyncio.wait_for(single, 1)  # the reserve (2) takes a single request at once
    await asyncio.sleep(0.01)
    assert not batch.done() and not waiting.done()  # but not a batch of 3: it queues
    room.free = 1
    queues.dispatch_all()
    await asyncio.wait_for(waiting, 1)  # a, first in line
    room.free = 2  # (a took 1; the batch goes at its turn with any room)
    queues.dispatch_all()
    await asyncio.wait_for(batch, 1)


async def test_a_batch_takes_the_replicas_room_of_its_sequences() -> None:
    room = Room()
    queues = Queues(room, GatewayMetrics(), timeout=5)
    batch = asyncio.create_task(queues.turn(DEPLOYMENT, account("batch"), False, 3))
    single = asyncio.create_task(queues.turn(DEPLOYMENT, account("single"), False))
    await asyncio.sleep(0)
    room.free = 3
    queues.dispatch_all()
    await asyncio.wait_for(batch, 1)
    # The batch was let go first and took the 3 sequences of room: the single one waits.
    assert not single.done()
    queue = queues.queues[DEPLOYMENT.name]
    assert queue.dispatched == 0 and queue.length == 1
    room.free = 4
    queues.dispatch_all()
    await asyncio.wait_for(single, 1)


@pytest.mark.parametrize("priority_tier", [True, False])
async def test_the_priority_tier_is_an_entitlement(tmp_path: Path, priority_tier: bool) -> None:
    """A flooding account marks its requests priority: only when the registry entitles it
    do they go before the other account's, and reach the workers' scheduler as priority;
    otherwise they are standard requests, the tier reported as ignored, and the accounts
    take turns."""
    at_workers: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        at_workers.append(json.loads(request.content))
        return httpx.Response(200, headers={"content-type": "application/json"},
                              stream=Stream([Pause(0.3), json.dumps(COMPLETION).encode()]))

    h = build(tmp_path, handler, hosts=("w1", "w2"), listed_order=True,
              registry_of=lambda urls: entitled(urls, priority_tier),
              queue_replica_load=1, load_from_workers=False)
    async with h.running() as client:
        def ask(key: str, prompt: str, **extra: str) -> asyncio.Task[httpx.Response]:
            return asyncio.create_task(client.post(
                "/v1/completions", headers=auth(key),
                json={"model": MODEL, "prompt": prompt} | extra))

        tasks = [ask(KEY, f"standard {n}") for n in range(5)]  # 2 run, 3 wait
        await asyncio.sleep(0.1)
        tasks += [ask(OTHER_KEY, f"flood {n}", service_tier="priority") for n in range(3)]
        responses = await asyncio.gather(*tasks)
    assert [r.status_code for r in responses] == [200] * 8
    queued = [body["prompt"].split()[0] for body in at_workers[2:]]
    floods = [body for body in at_workers if body["prompt"].startswith("flood")]
    ignored = orjson.loads(responses[-1].headers["fireworks-sampling-options"]).get(
        "ignored", [])
    if priority_tier:
        assert queued[:3] == ["flood"] * 3
        assert all(body["priority"] < 0 for body in floods)  # vLLM: lower goes first
        assert "service_tier" not in ignored
    else:  # the accounts take turns
        assert queued == ["standard", "flood"] * 3
        assert all("priority" not in body for body in floods)
        assert "service_tier" in ignored


async def test_batch_lines_take_only_the_room_past_the_headroom_and_never_hold_back() -> None:
    """Batch lines wait below every interactive request: an interactive one goes on while
    they wait, they go only into the room past the headroom, never time out, and a full
    queue never sheds them."""
    room = Room()
    room.free = 2  # two requests of room on the one replica; headroom 2: none for batch
    queues = Queues(room, GatewayMetrics(), max_length=1, timeout=0.05,
                    headroom=lambda deployment: 2)
    lines = [asyncio.create_task(queues.turn(DEPLOYMENT, account("nightly"), False,
                                             batch=True)) for _ in range(3)]
    await asyncio.sleep(0.1)  # past the timeout: batch lines do not time out
    assert not any(line.done() for line in lines)
    # Interactive requests go straight on: lines waiting do not count as waiting.
    assert await queues.turn(DEPLOYMENT, account("a"), False) is False
    # Saturated: an interactive request waits, and is let go first when room comes.
    room.free = 0
    waiting = asyncio.create_task(queues.turn(DEPLOYMENT, account("b"), False))
    await asyncio.sleep(0.01)
    # The queue holds max_length interactive requests: the lines are not shed for them.
    with pytest.raises(GatewayError):
        await queues.turn(DEPLOYMENT, account("c"), False)
    assert not any(line.done() for line in lines)
    room.free = 4  # the interactive one, then one past the headroom: one line goes
    queues.dispatch_all()
    await asyncio.sleep(0.01)
    assert waiting.done() and waiting.exception() is None
    assert sum(line.done() for line in lines) == 1
    assert queues.queues[DEPLOYMENT.name].interactive == 0
    for line in lines:
        line.cancel()
    await asyncio.gather(*lines, return_exceptions=True)


async def test_a_batch_line_goes_straight_on_only_when_nothing_waits() -> None:
    room = Room()
    room.free = 5
    queues = Queues(room, GatewayMetrics(), headroom=lambda deployment: 1)
    assert await queues.turn(DEPLOYMENT, account("n"), False, batch=True) is False
    room.free = 1  # nothing past the headroom
    line = asyncio.create_task(queues.turn(DEPLOYMENT, account("n"), False, batch=True))
    await asyncio.sleep(0.01)
    assert not line.done()
    room.free = 2
    queues.dispatch_all()
    assert await asyncio.wait_for(line, 1) is True
