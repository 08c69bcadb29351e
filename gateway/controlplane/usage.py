"""Usage records: one per request, appended exactly once, also for aborted and failed ones.

A request's end settles its rate-limit reservations with the real counts and appends its
record. With Redis that is `redis_ledger.py` (the records in the bulk instance, the
settlement in the state instance). Without Redis the record goes to the `gateway.usage` log
and the in-process totals, which keep the latest `keep` records.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
from pydantic import BaseModel, TypeAdapter

from gateway.controlplane.limits import Admission, Limiter

logger = logging.getLogger("gateway.usage")


@dataclass(slots=True, kw_only=True)
class UsageRecord:
    """One request's usage. A plain dataclass, not a pydantic model: one is made for every
    request, and a model's validation is a measurable share of a request's CPU for fields
    the gateway fills itself. Records read back from Redis are validated
    (`usage_record`)."""

    record_id: str
    request_id: str
    account: str
    deployment: str
    model: str
    replica: str = ""
    endpoint: str
    status: str  # "ok", "aborted" (client went away) or "error"
    http_status: int
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    ttft_ms: float | None = None
    duration_ms: float = 0.0
    time: float  # unix seconds at the end
    metadata: dict[str, str] | None = None  # the request's `metadata`, as the client sent it
    batch: str = ""  # the batch job the request was a line of ("": a client's own request)
    router: str = ""  # the router that chose the deployment, if any
    # The targets passed over before the one that served it: "<reason>:<name>", comma-separated
    fallback: str = ""


# Validates and converts what is read back (a Redis stream's fields are all text).
_RECORD = TypeAdapter(UsageRecord)
RECORD_FIELDS = tuple(field.name for field in dataclasses.fields(UsageRecord))


def usage_record(values: dict[str, Any]) -> UsageRecord:
    return _RECORD.validate_python(values)


def record_json(record: UsageRecord) -> str:
    return orjson.dumps(record).decode()


class UsageTotals(BaseModel):
    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    by_status: dict[str, int] = {}


    def add(self, record: UsageRecord) -> None:
        # Straight into the fields' storage: pydantic's __setattr__, a few times per request,
        # is a visible share of a request's CPU (and these ints need no validation).
        fields = self.__dict__
        fields["requests"] += 1
        fields["prompt_tokens"] += record.prompt_tokens
        fields["cached_tokens"] += record.cached_tokens
        fields["completion_tokens"] += record.completion_tokens
        self.by_status[record.status] = self.by_status.get(record.status, 0) + 1


def totals_of(records: Iterable[UsageRecord]) -> dict[str, UsageTotals]:
    totals: dict[str, UsageTotals] = {}
    for record in records:
        totals.setdefault(record.account, UsageTotals()).add(record)
    return totals


@dataclass(frozen=True)
class Backlog:
    """Usage records this gateway process has not yet written to Redis."""

    records: int = 0
    oldest_seconds: float = 0.0  # since the oldest waiting request ended


class Ledger(Protocol):
    def finish(self, record: UsageRecord, admission: Admission) -> None: ...

    def backlog(self) -> Backlog: ...

    @property
    def backlogged(self) -> bool:
        """Too many records wait for Redis: new requests are refused until they are in."""

    def unwritten(self, record_id: str) -> bool:
        """The record is still waiting to be written (a batch line is confirmed only once
        its record is in: gateway/batch/runner.py)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def totals(self) -> dict[str, UsageTotals]: ...


class LocalLedger:
    def __init__(self, limiter: Limiter, keep: int = 1000) -> None:
        self.limiter = limiter
        self.kept: deque[UsageRecord] = deque(maxlen=keep)  # the latest (tests look at them)
        self._totals: dict[str, UsageTotals] = {}

    def finish(self, record: UsageRecord, admission: Admission) -> None:
        self.limiter.settle(admission, record.prompt_tokens, record.completion_tokens,
                            record.cached_tokens)
        self.kept.append(record)
        totals = self._totals.get(record.account)
        if totals is None:
            totals = self._totals[record.account] = UsageTotals()
        totals.add(record)
        if logger.isEnabledFor(logging.INFO):
            logger.info("usage %s", record_json(record))

    @property
    def backlogged(self) -> bool:
        return False

    def backlog(self) -> Backlog:
        return Backlog()

    def unwritten(self, record_id: str) -> bool:
        return False  # written as it is made

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def totals(self) -> dict[str, UsageTotals]:
        return {account: total.model_copy(deep=True) for account, total in self._totals.items()}
