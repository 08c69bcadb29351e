"""Which replica's prefix cache a request wants: its affinity key.

A client names it (`x-multi-turn-session-id`, which wins, or `x-session-affinity`, or in the
body what its API reads: for the Fireworks APIs `prompt_cache_key` or `user`). When it does
not, the key is derived from the stable head of the prompt, as the request's API defines it
in its Call's `prefix_material` (for chat: the tools, the leading system messages and the
first user message, what every turn of one conversation and every request of one agent
starts with; for completions, the start of the prompt), at most `limit` bytes of it,
hashed. Requests that share that head go to the same replica (bounded by load as every
keyed request is: replicas.py), where vLLM's prefix cache already holds it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from gateway.api import Call

# The headers that name a key, first one present wins (the first groups the turns of one
# multi-turn session, as Fireworks' SDK sends it).
AFFINITY_HEADERS = ("x-multi-turn-session-id", "x-session-affinity")


def affinity_key(headers: Mapping[str, str], call: Call, prefix_bytes: int = 0) -> str | None:
    """The client's key, else (with prefix_bytes > 0) one derived from the prompt's head."""
    named = next((headers[h] for h in AFFINITY_HEADERS if headers.get(h)), None) \
        or call.affinity
    if named or prefix_bytes <= 0:
        return named
    material = call.prefix_material(prefix_bytes)
    return None if material is None else prefix_key(material)


def prefix_key(material: bytes) -> str:
    return "prefix:" + hashlib.blake2b(material, digest_size=12).hexdigest()
