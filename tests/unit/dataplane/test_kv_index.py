"""Routing on the workers' KV caches: vLLM's own event classes encoded as its publisher
encodes them, read into the index; the request's keys against them (LoRA, cache salt);
evictions, clears, lost parents; the scorer's cache-against-load bound; and a subscription
over real ZMQ sockets to a scripted publisher that loses events, replays and restarts."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgspec
import pytest
import zmq
import zmq.asyncio
from vllm.distributed.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
)

from gateway.api import CacheQuery
from gateway.controlplane.registry import Deployment, Replica
from gateway.dataplane.health import ReplicaHealth
from gateway.dataplane.kv_events import KvEvents, PodEvents, endpoints
from gateway.dataplane.kv_index import DECODER, BlockIndex, CacheHint, cache_hint, prompt_keys
from gateway.dataplane.replicas import AffinityOrLeastOutstanding, ReplicaSet
from tests.conftest import free_port_pair

BS = 4
ENCODE = msgspec.msgpack.Encoder().encode


def stored(hashes: list[bytes], parent: bytes | None, tokens: list[int],
           extra: list[tuple[Any, ...] | None] | None = None) -> BlockStored:
    return BlockStored(block_hashes=hashes, parent_block_hash=parent, token_ids=tokens,
                       block_size=BS, lora_id=None, medium="GPU", lora_name=None,
                       extra_keys=extra)


def batch(*events: Any) -> bytes:
    return ENCODE(KVEventBatch(ts=time.time(), events=list(events)))


def apply(index: BlockIndex, pod: str, *events: Any) -> None:
    index.apply(pod, DECODER.decode(batch(*events)))


TOKENS = list(range(10))  # two full blocks of 4, and 2 tokens that are never cached


def test_stored_blocks_are_found_by_the_requests_keys() -> None:
    index = BlockIndex()
    apply(index, "a", stored([b"h1", b"h2"], None, TOKENS[:8]))
    apply(index, "b", stored([b"h1"], None, TOKENS[:4]))
    keys = prompt_keys(TOKENS, BS, None, None)
    assert len(keys) == 2
    assert index.cached(keys, ["a", "b", "c"]) == {"a": 2, "b": 1, "c": 0}
    other = prompt_keys([9, *TOKENS[1:]], BS, None, None)
    assert index.cached(other, ["a", "b"]) == {"a": 0, "b": 0}


def test_a_run_stored_in_two_events_chains_through_the_parent() -> None:
    index = BlockIndex()
    apply(index, "a", stored([b"h1"], None, TOKENS[:4]))
    apply(index, "a", stored([b"h2"], b"h1", TOKENS[4:8]))
    assert index.cached(prompt_keys(TOKENS, BS, None, None), ["a"]) == {"a": 2}
    apply(index, "a", stored([b"x2"], b"never-seen", TOKENS[4:8]))  # an unknown parent
    assert index.pods["a"].keys.get(b"x2") is None


@pytest.mark.parametrize(("lora", "salt", "extra", "hits"), [
    (None, "s1", [("s1",), None], 2),
    (None, "s2", [("s1",), None], 0),  # another account's salt: nothing shared
    ("ad", None, [("ad",), ("ad",)], 2),
    ("ad", "s1", [("ad", "s1"), ("ad",)], 2),
    (None, None, [("ad",), ("ad",)], 0),  # the base model does not reuse an adapter's KV
])
def test_adapters_and_salts_are_part_of_the_key(lora: str | None, salt: str | None,
                                                 extra: list[tuple[Any, ...] | None],
                                                 hits: int) -> None:
    index = BlockIndex()
    apply(index, "a", stored([b"h1", b"h2"], None, TOKENS[:8], extra))
    assert index.cached(prompt_keys(TOKENS, BS, lora, salt), ["a"]) == {"a": hits}


def test_evictions_and_clears() -> None:
    index = BlockIndex()
    apply(index, "a", stored([b"h1", b"h2"], None, TOKENS[:8]))
    apply(index, "b", stored([b"g1", b"g2"], None, TOKENS[:8]))
    keys = prompt_keys(TOKENS, BS, None, None)
    apply(index, "a", BlockRemoved(block_hashes=[b"h2"], medium="GPU"))
    assert index.cached(keys, ["a", "b"]) == {"a": 1, "b": 2}
    apply(index, "b", AllBlocksCleared())
    assert index.cached(keys, ["a", "b"]) == {"a": 1, "b": 0}
    index.clear("a")
    assert index.holders == {} and index.cached(keys, ["a"]) == {"a": 0}


async def test_the_hint_tokenizes_only_when_it_has_to() -> None:
    index = BlockIndex()
    apply(index, "a", stored([b"h1", b"h2"], None, TOKENS[:8]))

    class Tokenizer:
        url = "a"

        def __init__(self) -> None:
            self.asked: list[dict[str, Any]] = []

        async def tokenize(self, body: dict[str, Any]) -> dict[str, Any]:
            self.asked.append(body)
            return {"tokens": TOKENS, "count": 10, "max_model_len": 100}

    tokenizer: Any = Tokenizer()
    query = CacheQuery(tokenize={"prompt": "x"})
    assert await cache_hint(index, ["a", "b"], query, None, tokenizer) is None  # not followed
    index.known.add("a")
    hint = await cache_hint(index, ["a", "b"], query, None, tokenizer)
    assert hint is not None and hint.cached == {"a": 2} and hint.blocks == 2
    ids = await cache_hint(index, ["a"], CacheQuery(token_ids=TOKENS[:5]), None, tokenizer)
    assert ids is not None and ids.cached == {"a": 1} and len(tokenizer.asked) == 1
    assert await cache_hint(index, ["a"], None, None, tokenizer) is None


async def test_routing_work_is_bounded_by_the_context_and_a_deadline() -> None:
    index = BlockIndex()
    index.known.add("a")
    apply(index, "a", stored([b"h1", b"h2"], None, TOKENS[:8]))

    class Tokenizer:
        url = "a"

        def __init__(self, hang: bool = False) -> None:
            self.asked = 0
            self.hang = hang

        async def tokenize(self, body: dict[str, Any]) -> dict[str, Any]:
            self.asked += 1
            if self.hang:
                await asyncio.sleep(60)
            return {"tokens": TOKENS, "count": 10, "max_model_len": 100}

    text = CacheQuery(tokenize={"prompt": "x"})
    tokenizer: Any = Tokenizer()
    # A request larger than 8 bytes per token of the context is past it: not tokenized.
    assert await cache_hint(index, ["a"], text, None, tokenizer, size=8 * 100 + 1,
                            context=100) is None
    assert tokenizer.asked == 0
    assert await cache_hint(index, ["a"], text, None, tokenizer, size=800,
                            context=100) is not None
    assert tokenizer.asked == 1
    # A tokenizer that does not answer in time: routed on the prefix hash, at the deadline.
    slow: Any = Tokenizer(hang=True)
    started = time.monotonic()
    assert await cache_hint(index, ["a"], text, None, slow, deadline=0.05) is None
    assert slow.asked == 1 and time.monotonic() - started < 1
    # Token ids past the context: block keys for the context's blocks only.
    ids = CacheQuery(token_ids=list(range(1_000_000)))
    hint = await cache_hint(index, ["a"], ids, None, tokenizer, context=10)
    assert hint is not None and hint.blocks == 10 // BS


def test_the_scorer_weighs_cache_against_load() -> None:
    policy = AffinityOrLeastOutstanding(max_imbalance=4, pick=lambda tied: tied[0])
    a, b, c = Replica(url="http://a"), Replica(url="http://b"), Replica(url="http://c")
    idle = {"http://a": 0, "http://b": 0, "http://c": 0}
    whole = CacheHint({"http://b": 4}, blocks=4)  # b holds the whole prompt
    assert policy.choose([a, b, c], idle, None,
                         CacheHint({"http://b": 3, "http://c": 1}, blocks=4)) is b
    busy = idle | {"http://b": 4}
    assert policy.choose([a, b, c], busy, None, whole) is b  # within the bound
    busier = idle | {"http://b": 5}
    assert policy.choose([a, b, c], busier, None, whole) is a  # past it
    # Half the prompt cached buys half the bound: 2 more requests, not 3.
    half = CacheHint({"http://b": 2}, blocks=4)
    assert policy.choose([a, b, c], idle | {"http://b": 2}, None, half) is b
    assert policy.choose([a, b, c], idle | {"http://b": 3}, None, half) is a
    # What the least loaded pod holds too is no gain: b saves 1 block of 4 over a.
    both = CacheHint({"http://a": 3, "http://b": 4}, blocks=4)
    assert policy.choose([a, b, c], idle | {"http://b": 1, "http://c": 1}, None, both) is b
    assert policy.choose([a, b, c], idle | {"http://b": 2, "http://c": 2}, None, both) is a
    # Nothing cached anywhere: today's affinity decides, as without events.
    keyed = policy.choose([a, b, c], idle, "k", CacheHint({"http://a": 0}, blocks=4))
    assert keyed is policy.choose([a, b, c], idle, "k")


def test_requests_in_flight_count_as_coming_to_their_pod() -> None:
    """Before a pod publishes a prompt's blocks (after its prefill), a request that shares
    them goes where the first one went; the first one's end leaves only what the events say."""
    index = BlockIndex()
    pods = ["http://r1", "http://r2"]
    deployment = Deployment(id="d", account="a", model="m",
                            replicas=[Replica(url=u) for u in pods])
    replicas = ReplicaSet(AffinityOrLeastOutstanding(max_imbalance=4))
    keys = prompt_keys(TOKENS, BS, None, None)
    # Hints counted before any request was sent, so that `acquire` counts them again.
    hints = [CacheHint(index.cached(keys, pods), len(keys), tuple(keys), index)
             for _ in range(3)]
    assert hints[0].cached == {"http://r1": 0, "http://r2": 0}
    assert hints[0].now() is hints[0]  # nothing changed: not counted again
    first = replicas.acquire(deployment, hint=hints[0])
    second = replicas.acquire(deployment, hint=hints[1])
    assert second.replica.url == first.replica.url  # a hash or the load would split them
    assert second.routing == "cached-blocks=2/2; load=1"
    # A prompt that shares only the first block: one of its two blocks is coming there.
    head = prompt_keys([*TOKENS[:4], 90, 91, 92, 93], BS, None, None)
    assert index.cached(head, pods)[first.replica.url] == 1
    second.release()
    second.release()  # released once
    pod = first.replica.url
    apply(index, pod, stored([b"h1", b"h2"], None, TOKENS[:8]))  # the pod's events come
    first.release()
    assert index.coming == {}
    assert index.cached(keys, pods) == {u: 2 if u == pod else 0 for u in pods}
    # Events are what counts now: their eviction is seen.
    apply(index, pod, BlockRemoved(block_hashes=[b"h2"], medium="GPU"))
    third = replicas.acquire(deployment, hint=hints[2])
    assert third.replica.url == pod and third.routing == "cached-blocks=1/2; load=0"


def test_a_retry_or_a_trial_leaves_nothing_coming_where_it_did_not_run() -> None:
    index = BlockIndex()
    pods = ["http://r1", "http://r2"]
    deployment = Deployment(id="d", account="a", model="m",
                            replicas=[Replica(url=u) for u in pods])
    keys = prompt_keys(TOKENS, BS, None, None)
    hint = CacheHint(index.cached(keys, pods), len(keys), tuple(keys), index)
    replicas = ReplicaSet(AffinityOrLeastOutstanding())
    first = replicas.acquire(deployment, hint=hint)
    first.release()  # its pod failed: the retry goes elsewhere, drawn by nothing
    retry = replicas.acquire(deployment, exclude={first.replica.url}, hint=hint)
    assert retry.replica.url != first.replica.url
    assert index.cached(keys, pods)[first.replica.url] == 0
    assert index.cached(keys, pods)[retry.replica.url] == 2
    retry.release()
    # An ejected pod's trial request is no reason to send it more of the same prompt.
    health = ReplicaHealth(eject_after=1, ejection_seconds=0)
    health.failure("http://r1")
    on_trial = ReplicaSet(AffinityOrLeastOutstanding(), health)
    trial = on_trial.acquire(deployment, hint=hint)
    assert trial.replica.url == "http://r1" and trial.routing == "trial"
    assert index.coming == {}


def test_endpoints_of_a_pod() -> None:
    deployment = Deployment(id="d", account="x", model="m", kv_events_port=5557)
    assert endpoints(deployment, Replica(url="http://10.0.0.7:8000")) == \
        ("tcp://10.0.0.7:5557", "tcp://10.0.0.7:5558")
    own = Replica(url="http://127.0.0.1:8000", kv_events="tcp://127.0.0.1:7000")
    assert endpoints(deployment, own) == ("tcp://127.0.0.1:7000", "tcp://127.0.0.1:7001")
    assert endpoints(Deployment(id="d", account="x", model="m"),
                     Replica(url="http://h:1")) is None


class Publisher:
    """A scripted vLLM publisher: numbered batches on PUB, a replay buffer on ROUTER."""

    def __init__(self, context: zmq.asyncio.Context) -> None:
        self.port = free_port_pair()  # (the next port, the replay's, may be taken otherwise)
        self.replay_port = self.port + 1
        self.pub = context.socket(zmq.PUB)
        self.pub.bind(f"tcp://127.0.0.1:{self.port}")
        self.router = context.socket(zmq.ROUTER)
        self.router.bind(f"tcp://127.0.0.1:{self.replay_port}")
        self.buffer: list[tuple[int, bytes]] = []
        self.task = asyncio.get_running_loop().create_task(self.serve_replays())

    async def send(self, seq: int, payload: bytes, live: bool = True) -> None:
        self.buffer.append((seq, payload))
        if live:
            await self.pub.send_multipart([b"", seq.to_bytes(8, "big"), payload])

    async def serve_replays(self) -> None:
        while True:
            client, _, start = await self.router.recv_multipart()
            for seq, payload in self.buffer:
                if seq >= int.from_bytes(start, "big"):
                    await self.router.send_multipart([client, b"", b"", seq.to_bytes(8, "big"),
                                                      payload])
            await self.router.send_multipart([client, b"", b"",
                                              (-1).to_bytes(8, "big", signed=True), b""])

    def close(self) -> None:
        self.task.cancel()
        self.pub.close(0)
        self.router.close(0)


async def until(condition: Any, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_a_subscription_replays_gaps_and_sees_restarts() -> None:
    context = zmq.asyncio.Context()
    publisher = Publisher(context)
    index = BlockIndex()
    keys = prompt_keys(TOKENS, BS, None, None)
    task: asyncio.Task[None] | None = None
    try:
        # Before the gateway subscribed: only the replay buffer has it.
        await publisher.send(0, batch(stored([b"h1"], None, TOKENS[:4])), live=False)
        events = PodEvents("a", f"tcp://127.0.0.1:{publisher.port}",
                           f"tcp://127.0.0.1:{publisher.replay_port}", index, context)
        task = asyncio.get_running_loop().create_task(events.run())
        await until(lambda: index.cached(keys, ["a"]) == {"a": 1})
        assert "a" in index.known
        await asyncio.sleep(0.3)  # the SUB socket is connected
        # Batch 1 never arrives live; batch 2 does: the gap is replayed from the buffer.
        await publisher.send(1, batch(stored([b"h2"], b"h1", TOKENS[4:8])), live=False)
        await publisher.send(2, batch(BlockRemoved(block_hashes=[b"zz"], medium="GPU")))
        await until(lambda: index.cached(keys, ["a"]) == {"a": 2})
        assert events.last == 2
        # The pod restarts: its numbers begin again at 0, its old blocks are gone.
        publisher.buffer.clear()
        await publisher.send(0, batch(stored([b"n1"], None, [7, 7, 7, 7])))
        await until(lambda: index.cached(keys, ["a"]) == {"a": 0})
        assert index.cached(prompt_keys([7, 7, 7, 7], BS, None, None), ["a"]) == {"a": 1}
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert "a" not in index.known and "a" not in index.pods
    finally:
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        publisher.close()
        context.term()


async def test_subscriptions_follow_the_listed_pods() -> None:
    """Pods that appear (DNS discovery) are subscribed to, pods that leave are dropped with
    what the index knew of them."""
    listed: dict[str, tuple[str, str]] = {
        "http://a": ("tcp://127.0.0.1:1", "tcp://127.0.0.1:2")}
    index = BlockIndex()
    events = KvEvents(index, lambda: dict(listed), interval=0.5)
    try:
        await events.reconcile()
        assert set(events.pods) == {"http://a"}
        apply(index, "http://a", stored([b"h1"], None, TOKENS[:4]))
        index.known.add("http://a")
        listed["http://b"] = ("tcp://127.0.0.1:3", "tcp://127.0.0.1:4")
        del listed["http://a"]
        await events.reconcile()
        assert set(events.pods) == {"http://b"}
        assert "http://a" not in index.pods and "http://a" not in index.known
    finally:
        await events.stop()
