"""Stored responses: what the Responses API keeps of each response made with `store: true`,
so that `previous_response_id`, `GET` and `DELETE /responses/{id}` work whichever gateway
replica and worker serve the next call.

A stored response is the response object as its client got it, and the conversation that
led to it: the input items of every earlier turn and their outputs, then this turn's input.
The next turn's input is that conversation, this response's output items, then the new
input (fireworks/responses.py). Stored per account: the key holds the account id, so
another account's lookup finds nothing (404), whatever the id.

With Redis, one key per response (`<prefix>response:<account>:<id>`) with a TTL
(`responses_ttl`), shared by every gateway replica. Without Redis, in this process only,
with the same TTL and at most LOCAL_MAX responses (the oldest go first), so that memory
stays bounded.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
import redis.asyncio as aioredis

LOCAL_MAX = 10_000  # responses one gateway process keeps without Redis


@dataclass
class StoredResponse:
    response: dict[str, Any]  # as the client got it
    conversation: list[Any]  # the input items that led to it, earlier turns included

    def next_input(self) -> list[Any]:
        """The input items a following turn starts with: the conversation and the
        response's own output."""
        output = self.response.get("output")
        return [*self.conversation, *(output if isinstance(output, list) else [])]

    def encode(self) -> bytes:
        return orjson.dumps({"response": self.response, "conversation": self.conversation})

    @classmethod
    def decode(cls, raw: bytes | str) -> StoredResponse:
        data = orjson.loads(raw)
        return cls(data["response"], data["conversation"])


class ResponseStore(Protocol):
    async def save(self, account: str, response_id: str, stored: StoredResponse) -> None: ...

    async def load(self, account: str, response_id: str) -> StoredResponse | None: ...

    async def delete(self, account: str, response_id: str) -> bool:
        """Whether there was one to delete."""
        ...


class LocalResponses:
    """In this process: expiring after `ttl` seconds, at most `max_entries`."""

    def __init__(self, ttl: float, max_entries: int = LOCAL_MAX) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self.entries: OrderedDict[tuple[str, str], tuple[float, bytes]] = OrderedDict()

    async def save(self, account: str, response_id: str, stored: StoredResponse) -> None:
        key = (account, response_id)
        self.entries.pop(key, None)
        self.entries[key] = (time.monotonic() + self.ttl, stored.encode())
        while len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)

    async def load(self, account: str, response_id: str) -> StoredResponse | None:
        entry = self.entries.get((account, response_id))
        if entry is None:
            return None
        if entry[0] <= time.monotonic():
            del self.entries[(account, response_id)]
            return None
        return StoredResponse.decode(entry[1])

    async def delete(self, account: str, response_id: str) -> bool:
        return await self.load(account, response_id) is not None and \
            self.entries.pop((account, response_id), None) is not None


class RedisResponses:
    """In Redis, shared by every gateway replica: one key per response, expiring."""

    def __init__(self, client: aioredis.Redis, prefix: str, ttl: float) -> None:
        self.client = client
        self.prefix = prefix
        self.ttl = max(1, int(ttl))

    def _key(self, account: str, response_id: str) -> str:
        return f"{self.prefix}response:{account}:{response_id}"

    async def save(self, account: str, response_id: str, stored: StoredResponse) -> None:
        await self.client.set(self._key(account, response_id), stored.encode(), ex=self.ttl)

    async def load(self, account: str, response_id: str) -> StoredResponse | None:
        raw = await self.client.get(self._key(account, response_id))
        return None if raw is None else StoredResponse.decode(raw)

    async def delete(self, account: str, response_id: str) -> bool:
        return bool(await self.client.delete(self._key(account, response_id)))
