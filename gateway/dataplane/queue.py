"""The gateway's queue per deployment: while a deployment's workers are saturated, requests
wait here, in an order the gateway chooses, instead of in the workers' arrival order.

A replica is saturated when its load (the requests its worker reports running and waiting,
plus those this gateway started since: load.py) reaches the deployment's `queue_replica_load`.
A request goes straight on while its deployment has a replica below that and nothing waits;
otherwise it joins the deployment's queue. Requests leave the queue as replicas free up
(a lease released, a new load reading): the highest priority first (`service_tier`
"priority" above standard, then the account's `priority` in the registry), and within one
priority fair across accounts by weight (deficit round robin: each account gets `weight`
turns per round, so a flooding account waits behind its own requests, not in front of the
others'; an account with nothing waiting goes first).

Requests of an account with nothing waiting may also take a replica up to `queue_reserve`
past saturation (set `queue_replica_load` + `queue_reserve` to the workers' --max-num-seqs):
while the deployment is saturated, an occasional request of a light account starts at once
in the reserve, where it would otherwise wait for the next request to end; the accounts
whose requests wait cannot use it, as their requests wait behind their own.

Batch lines (gateway/batch/) wait in a band below every interactive request: they go only
while no interactive request waits, and only into the room past the deployment's headroom per
replica (kept for interactive requests: `batch_headroom`, and at least one request short of
saturation, so that an idle deployment runs them), however long that takes; an interactive
request never waits behind one, and a full queue never sheds one (each gateway runs a bounded
number of lines at once, so the band is bounded by that).

Bounded in time and length: a request waits at most `queue_timeout` seconds, then gets a 503
with `retry-after`; a deployment holds at most `queue_max_length` waiting requests, and when
full one is shed (503 with `retry-after`): in the lowest priority present, the newest request
of the account with the most waiting (the arriving one, if it is that account's or of a
lower priority), so that a flooding account's requests are shed, not the others'. The queue
is per gateway process; docs/operations.md says what several gateways sharing the workers do.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.controlplane.registry import Account, Deployment
from gateway.errors import GatewayError, TargetUnavailable
from gateway.metrics import GatewayMetrics

Priority = tuple[int, int]  # (service tier, account priority): higher goes first
BATCH: Priority = (-1, 0)  # batch lines: below every interactive tier


@dataclass(eq=False)
class Waiter:
    account: str
    weight: int
    priority: Priority
    turn: asyncio.Future[None]
    cost: int = 1  # the sequences it asks the workers for
    since: float = field(default_factory=time.monotonic)


class Band:
    """The waiters of one priority: a FIFO per account, served by deficit round robin."""

    def __init__(self) -> None:
        self.flows: OrderedDict[str, deque[Waiter]] = OrderedDict()  # round-robin order
        self.deficits: dict[str, int] = {}
        self.new: set[str] = set()  # accounts not served since they started waiting
        # Credit an account overspent (a batch costs its sequences) when its flow emptied:
        # kept while others wait, so that leaving and coming back does not wipe the debt.
        self.debts: dict[str, int] = {}
        self.size = 0

    def push(self, waiter: Waiter) -> None:
        debt = self.debts.pop(waiter.account, 0) if waiter.account not in self.flows else 0
        if debt:  # it still owes turns: it joins the round at its end, not ahead of it
            self.flows[waiter.account] = deque()
            self.deficits[waiter.account] = debt
        elif waiter.account not in self.flows:
            # An account with nothing waiting goes ahead of the round, after the other new
            # ones, with a turn in hand (as fq_codel serves new flows first): a light
            # account's request goes next, while a flooding account always has requests
            # waiting and takes its turns in the round.
            ahead = [name for name in self.flows if name in self.new]
            self.flows[waiter.account] = deque()
            self.flows.move_to_end(waiter.account, last=False)
            for name in reversed(ahead):
                self.flows.move_to_end(name, last=False)
            self.new.add(waiter.account)
            self.deficits[waiter.account] = waiter.weight
        self.flows[waiter.account].append(waiter)
        self.size += 1

    def pop(self) -> Waiter:
        """The next turn: the account at the head of the round, while it has credit."""
        while True:
            account, flow = next(iter(self.flows.items()))
            if self.deficits[account] <= 0:
                self.deficits[account] += flow[0].weight
                self.flows.move_to_end(account)  # credit for its next round; others first
                continue
            self.deficits[account] -= flow[0].cost  # a batch of 50 spends 50 turns' credit
            self.new.discard(account)
            waiter = flow.popleft()
            self.size -= 1
            if not flow:
                self._empty(account)
            return waiter

    def remove(self, waiter: Waiter) -> bool:
        flow = self.flows.get(waiter.account)
        if flow is None or waiter not in flow:
            return False
        flow.remove(waiter)
        self.size -= 1
        if not flow:
            self._empty(waiter.account)
            self.new.discard(waiter.account)
        return True

    def _empty(self, account: str) -> None:
        del self.flows[account]
        deficit = self.deficits.pop(account)
        if deficit < 0:
            self.debts[account] = deficit
        if not self.flows:  # no one waits: nothing to be fair about any more
            self.debts.clear()

    def longest(self) -> tuple[str, int]:
        """The account with the most requests waiting, and how many."""
        account = max(self.flows, key=lambda name: len(self.flows[name]))
        return account, len(self.flows[account])


class DeploymentQueue:
    def __init__(self) -> None:
        self.bands: dict[Priority, Band] = {}
        self.length = 0
        self.dispatched = 0  # let go, not yet holding a lease: capacity already promised

    def push(self, waiter: Waiter) -> None:
        self.bands.setdefault(waiter.priority, Band()).push(waiter)
        self.length += 1

    @property
    def interactive(self) -> int:
        """Requests waiting, batch lines apart."""
        batch = self.bands.get(BATCH)
        return self.length - (batch.size if batch is not None else 0)

    def next_priority(self) -> Priority:
        return max(p for p, band in self.bands.items() if band.size)

    def pop(self) -> Waiter:
        priority = self.next_priority()
        self.length -= 1
        return self.bands[priority].pop()

    def has(self, account: str) -> bool:
        """Whether the account has a request waiting."""
        return any(account in band.flows for band in self.bands.values())

    def remove(self, waiter: Waiter) -> bool:
        band = self.bands.get(waiter.priority)
        if band is None or not band.remove(waiter):
            return False
        self.length -= 1
        return True

    def victim(self, arriving: Priority, account: str) -> Waiter | None:
        """Whom a full queue sheds for a request arriving: the newest request of the account
        with the most waiting in the lowest priority present (so a flood pays for itself,
        not the others); None when that is the arriving request."""
        present = [p for p, band in self.bands.items() if band.size and p != BATCH]
        if not present:  # only batch lines wait, and they are not shed: the arriving one is
            return None
        lowest = min(present)
        if arriving < lowest:
            return None
        band = self.bands[lowest]
        longest, waiting = band.longest()
        if arriving == lowest and len(band.flows.get(account, ())) + 1 >= waiting:
            return None
        return band.flows[longest][-1]


# Requests the deployment's replicas can still take before saturation, plus `extra` each.
Free = Callable[[Deployment, int], int]


class Queues:
    def __init__(self, free: Free, metrics: GatewayMetrics, max_length: int = 1000,
                 timeout: float = 30.0, reserve: int = 0,
                 headroom: Callable[[Deployment], int] = lambda deployment: 0) -> None:
        self.free = free
        self.reserve = reserve  # per replica, for accounts with nothing waiting
        self.headroom = headroom  # per replica, kept from batch lines
        self.metrics = metrics
        self.max_length = max_length
        self.timeout = timeout
        self.queues: dict[str, DeploymentQueue] = {}
        self.deployments: dict[str, Deployment] = {}

    async def turn(self, deployment: Deployment, account: Account, priority: bool,
                   cost: int = 1, *, batch: bool = False) -> bool:
        """Returns when the request may take a replica (True when it waited for that);
        raises 503 when it is shed. `cost`: the sequences it asks for, which it takes of
        the replicas' room and of its account's turns. `batch`: a batch line (the band
        below every other; no timeout, never shed)."""
        queue = self.queues.get(deployment.name)
        promised = 0 if queue is None else queue.dispatched
        # Straight on only with room for all its sequences (a batch larger than the room
        # queues, and goes at its turn as soon as there is any room: it never starves).
        # Batch lines waiting do not hold interactive requests back.
        if batch:
            if (queue is None or queue.length == 0) \
                    and self._batch_room(deployment, promised) >= cost:
                return False
        elif (queue is None or queue.interactive == 0) \
                and self.free(deployment, 0) - promised >= cost:
            return False  # nothing waits and there is room: go on
        elif self.reserve and (queue is None or not queue.has(account.id)) \
                and self.free(deployment, self.reserve) - promised >= cost:
            return False  # an account with nothing waiting takes the reserve: no wait
        queue = self.queues.setdefault(deployment.name, DeploymentQueue())
        self.deployments[deployment.name] = deployment
        tier = BATCH if batch else (1 if priority else 0, account.priority)
        waiter = Waiter(account.id, account.weight, tier,
                        asyncio.get_running_loop().create_future(), cost)
        if not batch and queue.interactive >= self.max_length:
            victim = queue.victim(tier, account.id)
            if victim is None:
                self._count_shed(deployment, tier, "full")
                raise _full(deployment)
            queue.remove(victim)
            self._count_shed(deployment, victim.priority, "full")
            victim.turn.set_exception(_full(deployment))
            self._gauge(deployment, victim.priority, queue)
        queue.push(waiter)
        self._gauge(deployment, tier, queue)
        self.dispatch(deployment.name)
        try:
            await asyncio.wait_for(asyncio.shield(waiter.turn),
                                   None if batch else self.timeout)
        except TimeoutError:
            self._count_shed(deployment, tier, "timeout")
            raise _overloaded(deployment, f"no replica freed up in {self.timeout:g} s")\
                from None
        finally:
            if queue.remove(waiter):  # timed out or cancelled while still waiting
                self._gauge(deployment, tier, queue)
            elif waiter.turn.done() and not waiter.turn.cancelled() \
                    and waiter.turn.exception() is None:
                queue.dispatched -= cost  # it goes on to take its lease now
                self.metrics.queue_wait.labels(deployment.name, _label(tier)).observe(
                    time.monotonic() - waiter.since)
            if not waiter.turn.done():
                waiter.turn.cancel()
        return True

    def dispatch(self, name: str) -> None:
        """Let waiting requests go while the deployment's replicas have room."""
        queue, deployment = self.queues.get(name), self.deployments.get(name)
        if queue is None or deployment is None or queue.length == 0:
            return
        room = self.free(deployment, 0) - queue.dispatched
        while queue.length and room > 0:
            if queue.next_priority() == BATCH \
                    and self._batch_room(deployment, queue.dispatched) <= 0:
                return  # only batch lines left, and no room past the headroom
            waiter = queue.pop()
            queue.dispatched += waiter.cost
            room -= waiter.cost
            waiter.turn.set_result(None)
            self._gauge(deployment, waiter.priority, queue)

    def _batch_room(self, deployment: Deployment, promised: int) -> int:
        """Requests batch lines may still start: the room past the headroom."""
        return self.free(deployment, -self.headroom(deployment)) - promised

    def dispatch_all(self) -> None:
        """After a lease is released or the workers' load is read again."""
        for name, queue in self.queues.items():
            if queue.length:
                self.dispatch(name)

    def _gauge(self, deployment: Deployment, tier: Priority, queue: DeploymentQueue) -> None:
        band = queue.bands.get(tier)
        self.metrics.queue_length.labels(deployment.name, _label(tier)).set(
            band.size if band is not None else 0)

    def _count_shed(self, deployment: Deployment, tier: Priority, reason: str) -> None:
        self.metrics.shed.labels(deployment.name, _label(tier), reason).inc()


def _label(tier: Priority) -> str:
    if tier == BATCH:
        return "batch"
    return f"{'priority' if tier[0] else 'standard'}/{tier[1]}"


def _full(deployment: Deployment) -> GatewayError:
    """Shed: a fallback target may take the request (dataplane/targets.py)."""
    return TargetUnavailable(503, f"Deployment {deployment.name} is overloaded: its queue is "
                                  "full; retry later", "shed", headers={"retry-after": "1"})


def _overloaded(deployment: Deployment, why: str) -> GatewayError:
    return GatewayError(503, f"Deployment {deployment.name} is overloaded: {why}; retry "
                             "later", headers={"retry-after": "1"})
