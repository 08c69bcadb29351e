"""Stored responses: what the Responses API keeps of each response made with `store: true`,
so that `previous_response_id`, `GET` and `DELETE /responses/{id}` work whichever gateway
replica and worker serve the next call.

A stored response is the response object as its client got it, and the conversation that
led to it: the input items of every earlier turn and their outputs, then this turn's input.
The next turn's input is that conversation, this response's output items, then the new
input (fireworks/responses.py). Stored per account: the key holds the account id, so
another account's lookup finds nothing (404), whatever the id.

Bounded per account, since every account may be an adversary of every other: a stored
response holds at most `max_bytes` (encoded; `save` stores nothing larger: the Responses
API refuses a conversation already past it, and answers one that grows past it with
`store: false`), and an account keeps at most `per_account` responses and `account_bytes`
bytes (its oldest go first: an account crowds out only its own).

With Redis, one key per response (`<prefix>response:<account>:<id>`) with a TTL
(`responses_ttl`), shared by every gateway replica, and per account an index of its
responses by time and their sizes (`<prefix>responses:<account>` and `...:size`) that
enforce the caps. In the bulk Redis instance (docs/operations.md, "Redis"): every key
expires, so at its memory bound Redis evicts the responses unread the longest to make room,
and a save it refuses all the same is answered with `store: false`. Without Redis, in this
process only, with the same TTL and bounds, and at most LOCAL_MAX responses and
LOCAL_MAX_BYTES in all, past which the account holding the most loses its oldest, so that
memory stays bounded.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
import redis.asyncio as aioredis
from redis.exceptions import OutOfMemoryError

logger = logging.getLogger("gateway.responses")

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
    """In this process: expiring after `ttl` seconds; per account at most `per_account`
    responses and `account_bytes` bytes (its oldest dropped); at most `max_entries` and
    LOCAL_MAX_BYTES in all, past which the account holding the most loses its oldest."""

    def __init__(self, ttl: float, max_entries: int = LOCAL_MAX, max_bytes: int = 1 << 20,
                 per_account: int = 1000, account_bytes: int = 64 << 20) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self.max_bytes = min(max_bytes, account_bytes, LOCAL_MAX_BYTES)
        self.per_account = per_account
        self.account_bytes = account_bytes
        self.entries: OrderedDict[tuple[str, str], tuple[float, bytes]] = OrderedDict()
        self.of_account: dict[str, OrderedDict[str, None]] = {}  # ids, oldest first
        self.bytes_of: dict[str, int] = {}  # bytes held per account
        self.size = 0  # bytes held in all

    async def save(self, account: str, response_id: str, stored: StoredResponse) -> bool:
        raw = stored.encode()
        if len(raw) > self.max_bytes:
            return False
        self._drop((account, response_id))
        self.entries[(account, response_id)] = (time.monotonic() + self.ttl, raw)
        self.of_account.setdefault(account, OrderedDict())[response_id] = None
        self.bytes_of[account] = self.bytes_of.get(account, 0) + len(raw)
        self.size += len(raw)
        while len(self.of_account[account]) > self.per_account \
                or self.bytes_of[account] > self.account_bytes:
            self._drop((account, next(iter(self.of_account[account]))))
        while len(self.entries) > self.max_entries or self.size > LOCAL_MAX_BYTES:
            largest = max(self.bytes_of, key=self.bytes_of.__getitem__)
            self._drop((largest, next(iter(self.of_account[largest]))))
        return True

    def _drop(self, key: tuple[str, str]) -> None:
        entry = self.entries.pop(key, None)
        if entry is None:
            return
        account = key[0]
        self.size -= len(entry[1])
        self.bytes_of[account] -= len(entry[1])
        ids = self.of_account[account]
        del ids[key[1]]
        if not ids:
            del self.of_account[account], self.bytes_of[account]

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


# KEYS: the response, the account's index (ids by time saved, in ms), the account's sizes
# (id -> bytes). ARGV: the response encoded, ttl (s), its id, the account's caps (count,
# bytes), the prefix of the account's response keys. Index entries older than the TTL go
# (their keys have expired); past a cap the oldest go, never the one just saved.
SAVE_LUA = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local ttl = tonumber(ARGV[2])
local function drop(id)
  redis.call('DEL', ARGV[6] .. id)
  redis.call('ZREM', KEYS[2], id)
  redis.call('HDEL', KEYS[3], id)
end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now - ttl * 1000)) do
  drop(id)
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ttl)
redis.call('ZADD', KEYS[2], now, ARGV[3])
redis.call('HSET', KEYS[3], ARGV[3], string.len(ARGV[1]))
local total = 0
for _, size in ipairs(redis.call('HVALS', KEYS[3])) do total = total + tonumber(size) end
local count = redis.call('ZCARD', KEYS[2])
while count > tonumber(ARGV[4]) or total > tonumber(ARGV[5]) do
  local two = redis.call('ZRANGE', KEYS[2], 0, 1)
  local oldest = two[1]
  if oldest == ARGV[3] then oldest = two[2] end
  if not oldest then break end
  total = total - tonumber(redis.call('HGET', KEYS[3], oldest) or '0')
  drop(oldest)
  count = count - 1
end
redis.call('EXPIRE', KEYS[2], ttl)
redis.call('EXPIRE', KEYS[3], ttl)
"""


class RedisResponses:
    """In Redis, shared by every gateway replica: one key per response, expiring, and per
    account an index and sizes that bound how many it keeps and their bytes."""

    def __init__(self, client: aioredis.Redis, prefix: str, ttl: float,
                 max_bytes: int = 1 << 20, per_account: int = 1000,
                 account_bytes: int = 64 << 20,
                 on_refused: Callable[[str], None] = lambda data: None) -> None:
        self.client = client
        self.on_refused = on_refused  # a save Redis refused at its memory bound
        self.prefix = prefix
        self.ttl = max(1, int(ttl))
        self.max_bytes = min(max_bytes, account_bytes)
        self.per_account = per_account
        self.account_bytes = account_bytes
        self._save = client.register_script(SAVE_LUA)

    def _key(self, account: str, response_id: str) -> str:
        return f"{self.prefix}response:{account}:{response_id}"

    def _index(self, account: str) -> list[str]:
        return [f"{self.prefix}responses:{account}", f"{self.prefix}responses:{account}:size"]

    async def save(self, account: str, response_id: str, stored: StoredResponse) -> bool:
        raw = stored.encode()
        if len(raw) > self.max_bytes:
            return False
        try:
            await self._save(keys=[self._key(account, response_id), *self._index(account)],
                             args=[raw, self.ttl, response_id, self.per_account,
                                   self.account_bytes, self._key(account, "")])
        except OutOfMemoryError as exc:  # at its bound with nothing it may evict
            logger.warning("response %s not stored: Redis is full (maxmemory): %s",
                           response_id, exc)
            self.on_refused("responses")
            return False
        return True

    async def load(self, account: str, response_id: str) -> StoredResponse | None:
        raw = await self.client.get(self._key(account, response_id))
        return None if raw is None else StoredResponse.decode(raw)

    async def delete(self, account: str, response_id: str) -> bool:
        index, sizes = self._index(account)
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.delete(self._key(account, response_id))
            pipe.zrem(index, response_id)
            pipe.hdel(sizes, response_id)
            deleted, _, _ = await pipe.execute()
        return bool(deleted)
