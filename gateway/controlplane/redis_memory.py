"""How full each Redis instance is: read every few seconds into the metrics, and logged when
an instance evicts keys or nears its bound (docs/operations.md, "Redis").

The writes Redis refuses at its bound are counted where they are made (the usage ledger,
the response store); this watch tells what they cannot see: that the bulk instance is
evicting stored responses to make room, or that the state instance is close to refusing
registry and limit writes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError

logger = logging.getLogger("gateway.redis")
NEAR = 0.9  # of maxmemory: logged from here on


@dataclass(frozen=True)
class Memory:
    used: int  # bytes (used_memory)
    bound: int  # maxmemory in bytes; 0: none
    policy: str  # maxmemory-policy
    evicted: int  # keys evicted since the instance started


async def read_memory(client: aioredis.Redis) -> Memory:
    memory = await client.info("memory")
    stats = await client.info("stats")
    return Memory(int(memory["used_memory"]), int(memory["maxmemory"]),
                  str(memory["maxmemory_policy"]), int(stats["evicted_keys"]))


# (instance, what it holds now, keys evicted since the last reading)
Seen = Callable[[str, Memory, int], None]


class MemoryWatch:
    def __init__(self, instances: dict[str, aioredis.Redis], seen: Seen) -> None:
        self.instances = instances  # "state", and "bulk" when it is another instance
        self.seen = seen
        self._evicted: dict[str, int] = {}
        self._near: set[str] = set()  # instances past NEAR of their bound at the last check

    async def check(self) -> None:
        for name, client in self.instances.items():
            try:
                memory = await read_memory(client)
            except (RedisError, OSError):  # an outage is logged by the parts that wait on it
                continue
            last = self._evicted.get(name)
            evicted = 0 if last is None else max(memory.evicted - last, 0)
            self._evicted[name] = memory.evicted
            if evicted:
                logger.warning("Redis %s is at its memory bound (%d of %d bytes, %s): it "
                               "evicted %d keys since the last check", name, memory.used,
                               memory.bound, memory.policy, evicted)
            near = bool(memory.bound) and memory.used >= NEAR * memory.bound
            if near and name not in self._near and not evicted:  # once as it gets there
                logger.warning("Redis %s is near its memory bound (%d of %d bytes, %s): "
                               "past it, writes are %s", name, memory.used, memory.bound,
                               memory.policy, "refused" if memory.policy == "noeviction"
                               else "made room for by evicting keys")
            if near:
                self._near.add(name)
            else:
                self._near.discard(name)
            self.seen(name, memory, evicted)
