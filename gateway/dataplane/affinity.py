"""Which replica's prefix cache a request wants: its affinity key.

A client names it (`x-session-affinity`, `prompt_cache_key`, or `user`). When it does not,
the key is derived from the stable head of the prompt: for chat, the tools, the leading
system messages and the first user message (what every turn of one conversation, and every
request of one agent, starts with); for completions, the start of the prompt; at most
`limit` bytes of it, hashed. Requests that share that head go to the same replica (bounded
by load as every keyed request is: replicas.py), where vLLM's prefix cache already holds it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import orjson

from gateway.anthropic import MessagesRequest
from gateway.fireworks.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest

AFFINITY_HEADER = "x-session-affinity"


Body = ChatCompletionRequest | CompletionRequest | MessagesRequest | EmbeddingRequest


def affinity_key(headers: Mapping[str, str], body: Body,
                 prefix_bytes: int = 0) -> str | None:
    """The client's key, else (with prefix_bytes > 0) one derived from the prompt's head."""
    named = headers.get(AFFINITY_HEADER) or getattr(body, "prompt_cache_key", None) \
        or getattr(body, "user", None)
    if named or prefix_bytes <= 0 or isinstance(body, EmbeddingRequest):
        return named  # (an embedding reuses no cached prefix worth a key)
    return prefix_key(body, prefix_bytes)


def prefix_key(body: ChatCompletionRequest | CompletionRequest | MessagesRequest,
               limit: int) -> str:
    if isinstance(body, MessagesRequest):  # the system prompt, the tools, the first turn
        extra = body.model_extra or {}
        material = orjson.dumps([extra.get("system"), extra.get("tools"),
                                 body.messages[0]])[:limit]
    elif isinstance(body, ChatCompletionRequest):
        head: list[object] = [body.tools]
        for message in body.messages:
            head.append(message.model_dump(exclude_none=True))
            if message.role == "user":
                break
        material = orjson.dumps(head)[:limit]
    elif isinstance(body.prompt, str):
        material = body.prompt[:limit].encode()[:limit]  # not the whole prompt encoded
    else:
        first = body.prompt if not body.prompt or isinstance(body.prompt[0], int) \
            else body.prompt[0]
        material = orjson.dumps(first)[:limit]
    return "prefix:" + hashlib.blake2b(material, digest_size=12).hexdigest()
