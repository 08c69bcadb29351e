"""Each replica's load as the whole cluster puts it there, not as one gateway sees it.

Every health check also reads the worker's own Prometheus metrics (vLLM's `/metrics`):
requests running and waiting, and KV-cache usage. Those count every gateway's requests (and
any sent to the worker directly). Between two readings, this gateway adds what it started or
finished since the last one, so a burst from one gateway is seen at once:

    load = running + waiting (at the reading) - own in flight (at the reading) + own in flight

A replica without a reading (no metrics endpoint, or not read yet) counts its own in-flight
requests only, as before.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
KV_USAGE = "vllm:kv_cache_usage_perc"


@dataclass(frozen=True)
class WorkerLoad:
    running: int
    waiting: int
    kv_cache_usage: float  # 0..1


def parse_load(text: str) -> WorkerLoad | None:
    """The three series of vLLM's metrics text, summed over their label sets (one per
    engine); None when the text has none of them (not a vLLM worker)."""
    sums = {RUNNING: 0.0, WAITING: 0.0, KV_USAGE: 0.0}
    seen = False
    for line in text.splitlines():
        if not line.startswith("vllm:"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in sums:
            try:
                sums[name] += float(line.rsplit(" ", 1)[1])
            except (IndexError, ValueError):
                continue
            seen = True
    if not seen:
        return None
    return WorkerLoad(int(sums[RUNNING]), int(sums[WAITING]), sums[KV_USAGE])


@dataclass(frozen=True)
class Reading:
    load: WorkerLoad
    own: int  # this gateway's requests in flight on the replica when it was read
    at: float


class ReplicaLoad:
    def __init__(self, outstanding: Mapping[str, int], stale_after: float = 10.0) -> None:
        self.outstanding = outstanding  # this gateway's in flight, by replica URL
        self.stale_after = stale_after  # seconds; an older reading is not used
        self.readings: dict[str, Reading] = {}

    def record(self, url: str, load: WorkerLoad) -> None:
        self.readings[url] = Reading(load, self.outstanding.get(url, 0), time.monotonic())

    def forget_except(self, urls: set[str]) -> None:
        for url in set(self.readings) - urls:
            del self.readings[url]

    def read(self) -> dict[str, int]:
        """The load of each replica with a fresh reading."""
        now = time.monotonic()
        return {url: self.of(url) for url, reading in self.readings.items()
                if now - reading.at <= self.stale_after}

    def of(self, url: str) -> int:
        own = self.outstanding.get(url, 0)
        reading = self.readings.get(url)
        if reading is None or time.monotonic() - reading.at > self.stale_after:
            return own
        worker = reading.load.running + reading.load.waiting
        return max(own, worker - reading.own + own)
