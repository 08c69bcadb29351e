"""The gateway listens to every pod's KV-cache events (kv_index.py keeps what they say).

A deployment whose workers publish events (the launcher's `--kv-events-port`) names the port
in the registry (`kv_events_port`; a replica may name its own endpoint, `kv_events`). Every
gateway replica subscribes to every pod it routes to, discovered pods included: one
subscription per pod, started when the pod appears and stopped when it leaves. Each gateway
then holds the same picture of the cluster's caches without a shared store between them
(docs/architecture.md, "Routing on the workers' KV caches", says why not Redis).

Events come numbered. On subscribing, and after a gap in the numbers, the pod's replay
endpoint (the events port + 1) sends what its buffer still holds from the missing number on;
if the buffer no longer reaches back that far, or no replay answers, the pod's view is
cleared and rebuilt from the events that follow. A pod whose numbers start again (a number
already seen, with a newer time) has restarted with an empty cache: its view is cleared and
replayed from its first batch.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from urllib.parse import urlsplit

import msgspec
import zmq
import zmq.asyncio

from gateway.background import cancel, every
from gateway.controlplane.registry import Deployment, Replica
from gateway.dataplane.kv_index import DECODER, BlockIndex, EventBatch

logger = logging.getLogger("gateway.kv_events")
END_SEQ = -1  # the replay endpoint's last message
REPLAY_SECONDS = 2.0


def endpoints(deployment: Deployment, replica: Replica) -> tuple[str, str] | None:
    """The pod's event and replay endpoints, when its deployment publishes events."""
    if replica.kv_events:
        endpoint = replica.kv_events
    elif deployment.kv_events_port:
        endpoint = f"tcp://{urlsplit(replica.url).hostname}:{deployment.kv_events_port}"
    else:
        return None
    host, _, port = endpoint.rpartition(":")
    return endpoint, f"{host}:{int(port) + 1}"


class PodEvents:
    """One pod's subscription."""

    def __init__(self, pod: str, endpoint: str, replay: str, index: BlockIndex,
                 context: zmq.asyncio.Context) -> None:
        self.pod, self.endpoint, self.replay_endpoint = pod, endpoint, replay
        self.index, self.context = index, context
        self.last: int | None = None  # the number of the last batch applied
        self.last_ts = 0.0  # and its time

    async def run(self) -> None:
        sub = self.context.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.setsockopt(zmq.LINGER, 0)
        sub.connect(self.endpoint)
        try:
            await self.catch_up(0)  # what the pod cached before this subscription
            while True:
                frames = await sub.recv_multipart()
                if len(frames) == 3:
                    await self.take(int.from_bytes(frames[1], "big", signed=True), frames[2])
        finally:
            sub.close()
            self.index.forget(self.pod)

    async def take(self, seq: int, payload: bytes) -> None:
        try:
            batch = DECODER.decode(payload)
        except msgspec.DecodeError as exc:
            logger.warning("pod %s: an event batch that cannot be read: %s", self.pod, exc)
            self.index.clear(self.pod)  # what follows may build on what was in it
            self.last = seq
            return
        if self.last is not None and seq <= self.last:
            if batch.ts <= self.last_ts:
                return  # already applied (a replay overlapping live events)
            # Numbers that start again, with newer times: the pod restarted, empty.
            logger.info("pod %s restarted: its cached blocks are forgotten", self.pod)
            self.index.clear(self.pod)
            self.last = None
            await self.catch_up(0)
            return
        if self.last is not None and seq > self.last + 1:
            logger.warning("pod %s: events %d-%d lost, replaying", self.pod, self.last + 1,
                           seq - 1)
            await self.catch_up(self.last + 1)
            if self.last is not None and seq <= self.last:
                return
        self.apply(seq, batch)

    def apply(self, seq: int, batch: EventBatch) -> None:
        self.index.apply(self.pod, batch)
        self.last, self.last_ts = seq, batch.ts
        self.index.known.add(self.pod)

    async def catch_up(self, start: int) -> None:
        """The batches from `start` on, from the pod's replay buffer; the view is cleared
        when they cannot all be had."""
        complete = False
        dealer = self.context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(self.replay_endpoint)
        try:
            await dealer.send_multipart([b"", start.to_bytes(8, "big")])
            async with asyncio.timeout(REPLAY_SECONDS):
                expected: int | None = start
                while True:
                    frames = await dealer.recv_multipart()
                    if len(frames) != 4:
                        continue
                    seq = int.from_bytes(frames[2], "big", signed=True)
                    if seq == END_SEQ:
                        complete = expected is not None
                        break
                    if expected is not None and seq != expected and start > 0:
                        expected = None  # the buffer no longer reaches back to `start`
                    elif expected is not None:
                        expected = seq + 1
                    try:
                        self.apply(seq, DECODER.decode(frames[3]))
                    except msgspec.DecodeError:
                        expected = None  # a batch lost: what builds on it has no key
        except TimeoutError:
            logger.warning("pod %s: no replay from %s", self.pod, self.replay_endpoint)
        finally:
            dealer.close()
        if not complete and start > 0:
            self.index.clear(self.pod)  # rebuilt from the events that follow
        self.index.known.add(self.pod)


class KvEvents:
    """Subscriptions to every listed pod that publishes events, kept in step with the
    replicas (`listed`: pod URL -> (event endpoint, replay endpoint))."""

    def __init__(self, index: BlockIndex, listed: Callable[[], dict[str, tuple[str, str]]],
                 interval: float) -> None:
        self.index = index
        self.listed = listed
        self.interval = max(interval, 0.5)
        self.context: zmq.asyncio.Context | None = None
        self.pods: dict[str, tuple[tuple[str, str], asyncio.Task[None]]] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = every(self.interval, self.reconcile, "KV-event subscriptions", logger)

    async def reconcile(self) -> None:
        wanted = self.listed()
        for pod, (where, task) in list(self.pods.items()):
            if wanted.get(pod) != where or task.done():
                del self.pods[pod]
                await cancel(task)
                self.index.forget(pod)  # (a task cancelled before it ran forgot nothing)
        if wanted and self.context is None:
            self.context = zmq.asyncio.Context()
        for pod, where in wanted.items():
            if pod not in self.pods and self.context is not None:
                events = PodEvents(pod, *where, self.index, self.context)
                self.pods[pod] = (where, asyncio.get_running_loop().create_task(events.run()))

    async def stop(self) -> None:
        await cancel(self._task)
        for _, task in self.pods.values():
            await cancel(task)
        self.pods.clear()
        if self.context is not None:
            self.context.term()
