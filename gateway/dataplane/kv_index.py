"""Which pod holds which prompt blocks in its KV cache, from the pods' own KV-cache events.

vLLM publishes (`--kv-events-config`, kv_events.py subscribes) a `BlockStored` event for
each run of full blocks it caches, with vLLM's block hashes, the parent block's hash, the
blocks' token ids and their extra keys (the LoRA adapter's name, and the cache salt on a
prompt's first block), `BlockRemoved` when blocks are evicted, and `AllBlocksCleared`.

The index does not need vLLM's own hash values, which depend on a per-process random seed
unless PYTHONHASHSEED is fixed: it gives each block a chain key of its own, computed from the
same material vLLM hashes (the parent's key, the block's token ids, its extra keys), and
keeps per pod a map from vLLM's hash to that key. A request's keys are computed the same
way from its prompt's token ids, the deployment's block size, its adapter and its salt, so
its longest cached prefix on each pod is a run of dictionary lookups. A block whose parent
the index never saw (events lost) gets no key; kv_events.py rebuilds a pod's view from the
worker's replay buffer after a gap, or clears it when the gap cannot be replayed.

A pod publishes a prompt's blocks only once its prefill is done, seconds later on a busy
pod: until then the index counts the blocks of each request in flight as coming to the pod
it was sent to (`expect`), so that requests sent together with the same long head (one
document, many questions) go where the first went instead of each computing it somewhere.
"""

from __future__ import annotations

import asyncio
import hashlib
from array import array
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import orjson

from gateway.api import CacheQuery, Worker
from gateway.errors import GatewayError

ROOT = bytes(16)  # the parent key of a prompt's first block
Hash = bytes | int  # vLLM's block hash, as its events carry it


class BlockStored(msgspec.Struct, tag=True):
    block_hashes: list[Hash]
    parent_block_hash: Hash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    extra_keys: list[list[Any] | None] | None = None


class BlockRemoved(msgspec.Struct, tag=True):
    block_hashes: list[Hash]
    medium: str | None = None


class AllBlocksCleared(msgspec.Struct, tag=True):
    pass


class EventBatch(msgspec.Struct, array_like=True):
    ts: float
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]
    data_parallel_rank: int | None = None


DECODER = msgspec.msgpack.Decoder(EventBatch)


def block_key(parent: bytes, tokens: Sequence[int], extra: Sequence[Any] | None) -> bytes:
    """The chain key of one full block."""
    material = array("q", tokens).tobytes()
    tail = b"" if not extra else orjson.dumps(list(extra))
    return hashlib.blake2b(parent + material + b"\0" + tail, digest_size=16).digest()


def prompt_keys(tokens: Sequence[int], block_size: int, lora: str | None,
                salt: str | None) -> list[bytes]:
    """The chain keys of a prompt's full blocks, as its pod's events would give them."""
    keys, parent = [], ROOT
    for start in range(0, len(tokens) - block_size + 1, block_size):
        extra: list[Any] = [lora] if lora else []
        if start == 0 and salt:
            extra.append(salt)
        parent = block_key(parent, tokens[start:start + block_size], extra)
        keys.append(parent)
    return keys


@dataclass
class PodView:
    """What one pod has cached, as far as its events told."""

    keys: dict[Hash, bytes] = field(default_factory=dict)  # vLLM's hash -> chain key
    counts: dict[bytes, int] = field(default_factory=dict)  # vLLM hashes per chain key
    block_size: int | None = None


class BlockIndex:
    """Chain key -> the pods that hold that block; per pod, vLLM's hashes -> chain keys."""

    def __init__(self) -> None:
        self.pods: dict[str, PodView] = {}
        self.holders: dict[bytes, set[str]] = {}
        self.known: set[str] = set()  # pods whose events are being followed
        # Blocks that requests in flight will store: chain key -> pod -> how many requests.
        self.coming: dict[bytes, dict[str, int]] = {}
        self.version = 0  # changes with anything that changes `cached`

    def apply(self, pod: str, batch: EventBatch) -> None:
        self.version += 1
        view = self.pods.setdefault(pod, PodView())
        for event in batch.events:
            if isinstance(event, BlockStored):
                self._stored(pod, view, event)
            elif isinstance(event, BlockRemoved):
                self._removed(pod, view, event.block_hashes)
            else:
                self.clear(pod)
                view = self.pods.setdefault(pod, PodView())

    def _stored(self, pod: str, view: PodView, event: BlockStored) -> None:
        view.block_size = event.block_size
        if event.parent_block_hash is None:
            parent: bytes | None = ROOT
        else:
            parent = view.keys.get(event.parent_block_hash)
        size = event.block_size
        for i, vllm_hash in enumerate(event.block_hashes):
            if parent is None:
                return  # a parent the index never saw: the rest of the run has no key
            extra = event.extra_keys[i] if event.extra_keys and i < len(event.extra_keys) \
                else None
            key = block_key(parent, event.token_ids[i * size:(i + 1) * size], extra)
            if view.keys.get(vllm_hash) != key:
                self._removed(pod, view, [vllm_hash])
                view.keys[vllm_hash] = key
                view.counts[key] = view.counts.get(key, 0) + 1
                self.holders.setdefault(key, set()).add(pod)
            parent = key

    def _removed(self, pod: str, view: PodView, hashes: Iterable[Hash]) -> None:
        for vllm_hash in hashes:
            key = view.keys.pop(vllm_hash, None)
            if key is None:
                continue
            view.counts[key] -= 1
            if view.counts[key]:
                continue  # the pod still holds the block under another of vLLM's hashes
            del view.counts[key]
            pods = self.holders.get(key)
            if pods is not None:
                pods.discard(pod)
                if not pods:
                    del self.holders[key]

    def clear(self, pod: str) -> None:
        """Forget what the pod holds (restarted, gone, or events lost)."""
        self.version += 1
        view = self.pods.pop(pod, None)
        if view is None:
            return
        for key in view.counts:
            pods = self.holders.get(key)
            if pods is not None:
                pods.discard(pod)
                if not pods:
                    del self.holders[key]

    def forget(self, pod: str) -> None:
        """The pod is no longer followed (it left, or its subscription ended)."""
        self.clear(pod)
        self.known.discard(pod)

    def expect(self, pod: str, keys: Sequence[bytes]) -> Callable[[], None]:
        """A request with these blocks was sent to the pod; what to call when it ends."""
        self.version += 1
        for key in keys:
            pods = self.coming.get(key)
            if pods is None:
                self.coming[key] = {pod: 1}
            else:
                pods[pod] = pods.get(pod, 0) + 1

        def ended() -> None:
            self.version += 1
            for key in keys:
                pods = self.coming[key]
                pods[pod] -= 1
                if not pods[pod]:
                    del pods[pod]
                    if not pods:
                        del self.coming[key]
        return ended

    def block_size(self, pods: Iterable[str]) -> int | None:
        for pod in pods:
            view = self.pods.get(pod)
            if view is not None and view.block_size:
                return view.block_size
        return None

    def cached(self, keys: Sequence[bytes], pods: Iterable[str]) -> dict[str, int]:
        """Per pod, how many of the prompt's leading blocks it holds, or will once the
        requests in flight there have stored theirs."""
        matched = {pod: 0 for pod in pods}
        alive = set(matched)
        for depth, key in enumerate(keys):
            holders = self.holders.get(key)
            coming = self.coming.get(key)
            if coming:
                holders = coming.keys() | (holders or ())
            still = alive & holders if holders else set()
            for pod in alive - still:
                matched[pod] = depth
            alive = still
            if not alive:
                return matched
        for pod in alive:
            matched[pod] = len(keys)
        return matched


@dataclass
class CacheHint:
    """Per pod, how many of the request's `blocks` full prompt blocks it holds."""

    cached: dict[str, int]
    blocks: int
    keys: tuple[bytes, ...] = ()  # the blocks' chain keys
    index: BlockIndex | None = None
    version: int = 0  # the index's, when `cached` was counted

    def now(self) -> CacheHint:
        """The same, as the index stands now; counted again only when it changed (for a
        retry: events, other requests and this one's first attempt came and went since)."""
        if self.index is None or self.index.version == self.version:
            return self
        return CacheHint(self.index.cached(self.keys, self.cached), self.blocks, self.keys,
                         self.index, self.index.version)

    def expect(self, pod: str) -> Callable[[], None]:
        """The request goes to `pod`: its blocks count as coming there until `ended()`."""
        if self.index is None:
            return lambda: None
        return self.index.expect(pod, self.keys)


# Routing on the pods' caches costs a /tokenize of the prompt and a block key per block:
# bounded by the deployment's context. Byte-level tokenizers rarely put more than this many
# bytes in one token, so a request larger than this many bytes per token of the context is
# past it (the worker will refuse it): not tokenized, it routes on the prefix hash.
BYTES_PER_TOKEN = 8
DEFAULT_CONTEXT = 1 << 17  # tokens, for a deployment whose registry entry names none


async def cache_hint(index: BlockIndex, pods: list[str], query: CacheQuery | None,
                     lora: str | None, tokenizer: Worker, *, size: int = 0,
                     context: int | None = None, deadline: float = 0.5
                     ) -> CacheHint | None:
    """The request's cached prefix on each pod whose events the gateway follows; None when
    no such pod is in rotation or the prompt's tokens cannot be had in time (routing then
    falls back to the prefix hash). `tokenizer` renders the prompt when the client sent
    text, within `deadline` seconds, and only for a request of at most `size` bytes that can
    fit in the `context`; the blocks looked up are at most the context's."""
    followed = [pod for pod in pods if pod in index.known]
    block_size = index.block_size(followed)
    if query is None or not followed or block_size is None:
        return None
    context = context or DEFAULT_CONTEXT
    tokens = query.token_ids
    if tokens is None and query.tokenize is not None:
        if size > context * BYTES_PER_TOKEN:
            return None
        try:
            answer = await asyncio.wait_for(tokenizer.tokenize(query.tokenize), deadline)
            tokens = answer["tokens"]
        except (GatewayError, TimeoutError):
            return None
    return _hint(index, followed, block_size, tokens, lora, query.salt, context)


def cache_hint_now(index: BlockIndex, pods: list[str], query: CacheQuery, lora: str | None,
                   *, context: int | None = None) -> CacheHint | None:
    """cache_hint for a prompt given as token ids (nothing to ask a worker)."""
    followed = [pod for pod in pods if pod in index.known]
    block_size = index.block_size(followed)
    if not followed or block_size is None:
        return None
    return _hint(index, followed, block_size, query.token_ids, lora, query.salt,
                 context or DEFAULT_CONTEXT)


def _hint(index: BlockIndex, followed: list[str], block_size: int, tokens: list[int] | None,
          lora: str | None, salt: str | None, context: int) -> CacheHint | None:
    if not tokens:
        return None
    keys = prompt_keys(tokens[:context], block_size, lora, salt)
    return CacheHint(index.cached(keys, followed), len(keys), tuple(keys), index, index.version)
