"""Stored responses: what the Responses API keeps of each response made with `store: true`,
so that `previous_response_id`, `GET` and `DELETE /responses/{id}` work whichever gateway
replica and worker serve the next call.

A stored response is the response object as its client got it, and the conversation that
led to it: the input items of every earlier turn and their outputs, then this turn's input.
The next turn's input is that conversation, this response's output items, then the new
input (fireworks/responses.py). Stored per account: the key holds the account id, so
another account's lookup finds nothing (404), whatever the id.

Bounded per account, since every account may be an adversary of every other: a stored
response holds at most `max_bytes` (encoded; past it the response is answered but not
stored, and says `store: false`), and an account keeps at most `per_account` responses (its
oldest go first: an account crowds out only its own).

With Redis, one key per response (`<prefix>response:<account>:<id>`) with a TTL
(`responses_ttl`), shared by every gateway replica, and per account an index of its
responses by time (`<prefix>responses:<account>`, a sorted set) that enforces the count.
Without Redis, in this process only, with the same TTL and bounds, and at most LOCAL_MAX
responses and LOCAL_MAX_BYTES in all (the oldest go first), so that memory stays bounded.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
import redis.asyncio as aioredis

LOCAL_MAX = 10_000  # responses one gateway process keeps without Redis
LOCAL_MAX_BYTES = 256 << 20  # and their encoded size in all


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
    max_bytes: int  # the largest stored response, encoded

    async def save(self, account: str, response_id: str, stored: StoredResponse) -> bool:
        """Whether it was stored (False: larger than max_bytes)."""
        ...

    async def load(self, account: str, response_id: str) -> StoredResponse | None: ...

    async def delete(self, account: str, response_id: str) -> bool:
        """Whether there was one to delete."""
        ...


class LocalResponses:
    """In this process: expiring after `ttl` seconds; per account at most `per_account`;
    at most `max_entries` and LOCAL_MAX_BYTES in all."""

    def __init__(self, ttl: float, max_entries: int = LOCAL_MAX, max_bytes: int = 1 << 20,
                 per_account: int = 1000) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.per_account = per_account
        self.entries: OrderedDict[tuple[str, str], tuple[float, bytes]] = OrderedDict()
        self.of_account: dict[str, OrderedDict[str, None]] = {}  # ids, oldest first
        self.size = 0  # bytes held

    async def save(self, account: str, response_id: str, stored: StoredResponse) -> bool:
        raw = stored.encode()
        if len(raw) > self.max_bytes:
            return False
        self._drop((account, response_id))
        self.entries[(account, response_id)] = (time.monotonic() + self.ttl, raw)
        self.of_account.setdefault(account, OrderedDict())[response_id] = None
        self.size += len(raw)
        while len(self.of_account[account]) > self.per_account:
            self._drop((account, next(iter(self.of_account[account]))))
        while len(self.entries) > self.max_entries or self.size > LOCAL_MAX_BYTES:
            self._drop(next(iter(self.entries)))
        return True

    def _drop(self, key: tuple[str, str]) -> None:
        entry = self.entries.pop(key, None)
        if entry is None:
            return
        self.size -= len(entry[1])
        ids = self.of_account[key[0]]
        del ids[key[1]]
        if not ids:
            del self.of_account[key[0]]

    async def load(self, account: str, response_id: str) -> StoredResponse | None:
        entry = self.entries.get((account, response_id))
        if entry is None:
            return None
        if entry[0] <= time.monotonic():
            self._drop((account, response_id))
            return None
        return StoredResponse.decode(entry[1])

    async def delete(self, account: str, response_id: str) -> bool:
        found = await self.load(account, response_id) is not None
        self._drop((account, response_id))
        return found


# KEYS: the response, the account's index; ARGV: the response encoded, ttl (s), its id,
# the account's cap, the prefix of the account's response keys. The index's members expire
# with their keys (dropped here once older than the TTL); past the cap the oldest go.
SAVE_LUA = """
local now = tonumber(redis.call('TIME')[1])
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call('ZADD', KEYS[2], now, ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[2]))
local excess = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[4])
if excess > 0 then
  local oldest = redis.call('ZPOPMIN', KEYS[2], excess)
  for i = 1, #oldest, 2 do redis.call('DEL', ARGV[5] .. oldest[i]) end
end
redis.call('EXPIRE', KEYS[2], ARGV[2])
"""


class RedisResponses:
    """In Redis, shared by every gateway replica: one key per response, expiring, and an
    index per account that bounds how many it keeps."""

    def __init__(self, client: aioredis.Redis, prefix: str, ttl: float,
                 max_bytes: int = 1 << 20, per_account: int = 1000) -> None:
        self.client = client
        self.prefix = prefix
        self.ttl = max(1, int(ttl))
        self.max_bytes = max_bytes
        self.per_account = per_account
        self._save = client.register_script(SAVE_LUA)

    def _key(self, account: str, response_id: str) -> str:
        return f"{self.prefix}response:{account}:{response_id}"

    async def save(self, account: str, response_id: str, stored: StoredResponse) -> bool:
        raw = stored.encode()
        if len(raw) > self.max_bytes:
            return False
        await self._save(keys=[self._key(account, response_id),
                               f"{self.prefix}responses:{account}"],
                         args=[raw, self.ttl, response_id, self.per_account,
                               self._key(account, "")])
        return True

    async def load(self, account: str, response_id: str) -> StoredResponse | None:
        raw = await self.client.get(self._key(account, response_id))
        return None if raw is None else StoredResponse.decode(raw)

    async def delete(self, account: str, response_id: str) -> bool:
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.delete(self._key(account, response_id))
            pipe.zrem(f"{self.prefix}responses:{account}", response_id)
            deleted, _ = await pipe.execute()
        return bool(deleted)
