"""Per-account rate limits (requests per minute, prompt and generated tokens per minute,
concurrent requests) and token budgets (budgets.py): the rules, and their in-process form.

Admission checks the limits, then the budgets: a request is admitted only when both admit
it. Token limits and budgets reserve on admission (an estimate of the prompt, and
max_tokens x n) and are settled with the real usage when the request ends. Counted kinds
(requests, concurrency) stop at the limit; token kinds stop when the reservation would pass
it, except on an empty per-minute window, so that one request larger than the whole limit is
not refused forever (a budget has no such exception: it refuses until its window ends).

With Redis the same rules run in one Lua script shared by every gateway replica
(redis_limits.py); without it, in process (`LocalLimiter`).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from gateway.controlplane.budgets import Budget, Hold, LocalBudgets, Refusal, window
from gateway.controlplane.registry import Account, Limits
from gateway.errors import GatewayError

WINDOW = 60  # seconds
KINDS = ("requests", "prompt_tokens", "generated_tokens", "concurrent_requests")
# No reservation is larger (Redis counts in 64-bit integers; Lua numbers lose integers
# past 2^53 and print large ones in exponent form, which HINCRBY refuses).
MAX_RESERVATION = 1 << 40


@dataclass
class Admission:
    """One admitted request's reservation."""

    record_id: str
    account: str
    limited: bool = False  # the account has limits (its usage counts against them)
    prompt_reserved: int = 0
    generated_reserved: int = 0
    bucket: int | None = None  # the reservation's second; None when nothing was reserved
    headers: dict[str, str] = field(default_factory=dict)
    holds: list[Hold] = field(default_factory=list)  # one per budget of the account


def limit_headers(limits: Limits, used: dict[str, int]) -> dict[str, str]:
    """Spec 4.3, per-minute values. Only for accounts that have limits."""
    headers: dict[str, str] = {}
    if limits.requests_per_minute:
        remaining = max(limits.requests_per_minute - used["requests"], 0)
        headers["x-ratelimit-limit-requests"] = str(limits.requests_per_minute)
        headers["x-ratelimit-remaining-requests"] = str(remaining)
        headers["x-ratelimit-over-limit"] = "yes" if remaining == 0 else "no"
    if limits.prompt_tokens_per_minute:
        headers["x-ratelimit-limit-tokens-prompt"] = str(limits.prompt_tokens_per_minute)
    if limits.generated_tokens_per_minute:
        headers["x-ratelimit-limit-tokens-generated"] = str(limits.generated_tokens_per_minute)
        headers["x-ratelimit-remaining-tokens-generated"] = str(
            max(limits.generated_tokens_per_minute - used["generated_tokens"], 0))
    return headers


class RateLimited(GatewayError):
    def __init__(self, kind: str, retry_after: int, headers: dict[str, str],
                 message: str = "") -> None:
        what = {"requests": "requests per minute", "prompt_tokens": "prompt tokens per minute",
                "generated_tokens": "generated tokens per minute",
                "concurrent_requests": "concurrent requests"}.get(kind, kind)
        super().__init__(429, message or f"Rate limit exceeded: {what} for this account",
                         headers=headers | {"retry-after": str(max(retry_after, 1))})
        self.kind = kind


class BudgetSpent(RateLimited):
    """429 until the window's end: the request's reservation does not fit what is left of
    one of the account's budgets."""

    def __init__(self, budget: Budget, used: int, reserve: int, retry_after: int,
                 headers: dict[str, str] | None = None) -> None:
        left = max(budget.tokens - used, 0)
        super().__init__("budget", retry_after, headers or {}, (
            f"Token budget exceeded: this account's {budget.window} budget '{budget.name}' "
            f"has {left} of {budget.tokens} tokens left, and this request may cost "
            f"{reserve}; it renews at the start of the next UTC {budget.window}"))
        self.budget = budget


# (account, budget, the window's spend, what happened: "admitted", "refused" or "shadow":
# admitted, where the budget alone would have refused it), for the metrics and the log.
BudgetReport = Callable[[str, Budget, int, str], None]


def budget_reserves(budgets: list[Budget], prompt: int, generated: int) -> list[int]:
    return [min(b.reservation(prompt, generated), MAX_RESERVATION) for b in budgets]


def exceeds(used: int, reserve: int, limit: int, *, counts: bool) -> bool:
    """Counted kinds (requests, concurrency) stop at the limit. Token kinds stop when the
    reservation would pass it, except on an empty window, so that one request larger than the
    whole budget is not refused forever (the same rule as ADMIT_LUA)."""
    if counts:
        return used >= limit
    return used > 0 and used + reserve > limit


class Limiter(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def admit(self, account: Account, prompt_tokens: int, generated_tokens: int,
                    record_id: str) -> Admission:
        """For an account with limits or budgets (dataplane/request.py skips the others)."""

    async def extend(self, account: Account, admission: Admission,
                     generated_tokens: int) -> None:
        """Reserve more generated tokens for an admitted request (a fallback target that
        may generate more than the first reserved for): the same rules as `admit`, but no
        request is counted; refused: RateLimited, and the admission is unchanged."""

    def settle(self, admission: Admission, prompt_tokens: int, generated_tokens: int,
               cached_tokens: int = 0) -> None:
        """In-process settlement at the request's end (the Redis limiter settles in
        redis_ledger.py's settlement; here it stops refreshing the slot)."""

    async def spent(self, account: str, budgets: list[Budget]) -> list[Spent]:
        """Each budget's current window (the admin API)."""


@dataclass
class Spent:
    """A budget's current window, for the admin API."""

    budget: Budget
    window: str  # its id: YYYYMMDD or YYYYMM
    resets_at: int  # unix seconds
    used: int  # spent, with the reservations of requests in flight
    refused: int  # requests it refused
    shadow: int  # requests it would have refused (shadow mode)

    @classmethod
    def of(cls, budget: Budget, window_id: str, ends: int, values: dict[str, int]) -> Spent:
        return cls(budget, window_id, ends, values.get("used", 0), values.get("refused", 0),
                   values.get("shadow", 0))


class LocalLimiter:
    """The same windows in process, for a single gateway without Redis."""

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def __init__(self,
                 report: BudgetReport = lambda account, budget, used, outcome: None) -> None:
        self.budgets = LocalBudgets()
        self.report = report
        # account -> deque of [time, prompt, generated] per admitted request, and the
        # window's sums of prompt and generated (kept, not summed per request: a window can
        # hold a minute of requests)
        self.windows: dict[str, deque[list[float]]] = {}
        self.sums: dict[str, list[float]] = {}
        self.concurrent: dict[str, set[str]] = {}
        self._entries: dict[str, list[float]] = {}

    async def admit(self, account: Account, prompt_tokens: int, generated_tokens: int,
                    record_id: str) -> Admission:
        limits = account.limits
        admission = Admission(record_id, account.id, limited=True)
        now = time.monotonic()
        window, sums = self._window(account.id, now)
        running = self.concurrent.setdefault(account.id, set())
        used = {"requests": len(window), "prompt_tokens": int(sums[0]),
                "generated_tokens": int(sums[1]), "concurrent_requests": len(running)}
        wait = int(window[0][0] + WINDOW - now) + 1 if window else 1
        for kind, limit, reserve in (
                ("concurrent_requests", limits.concurrent_requests, 0),
                ("requests", limits.requests_per_minute, 0),
                ("prompt_tokens", limits.prompt_tokens_per_minute, prompt_tokens),
                ("generated_tokens", limits.generated_tokens_per_minute, generated_tokens)):
            if limit and exceeds(used[kind], reserve, limit, counts=reserve == 0):
                raise RateLimited(kind, 1 if kind == "concurrent_requests" else wait,
                                limit_headers(limits, used))
        reserves = budget_reserves(account.budgets, prompt_tokens, generated_tokens)
        holds = self.budgets.admit(account.id, account.budgets, reserves, time.time())
        if isinstance(holds, Refusal):
            self.report(account.id, holds.budget, holds.used, "refused")
            raise BudgetSpent(holds.budget, holds.used, holds.reserve, holds.retry_after,
                              limit_headers(limits, used))
        for hold in holds:
            self.report(account.id, hold.budget, hold.used,
                        "shadow" if hold.used > hold.budget.tokens else "admitted")
        admission.holds = holds
        entry = [now, float(prompt_tokens), float(generated_tokens)]
        window.append(entry)
        sums[0] += entry[1]
        sums[1] += entry[2]
        running.add(record_id)
        self._entries[record_id] = entry
        used["requests"] += 1
        used["generated_tokens"] += generated_tokens
        admission.prompt_reserved, admission.generated_reserved = prompt_tokens, generated_tokens
        admission.bucket = 0
        admission.headers = limit_headers(limits, used)
        return admission

    def _window(self, account: str, now: float) -> tuple[deque[list[float]], list[float]]:
        """The account's last minute of admissions, and their sums, older ones dropped."""
        window = self.windows.setdefault(account, deque())
        sums = self.sums.setdefault(account, [0.0, 0.0])
        while window and window[0][0] <= now - WINDOW:
            gone = window.popleft()
            sums[0] -= gone[1]
            sums[1] -= gone[2]
            gone[0] = -1.0  # out of the window (a request still running settles nothing)
        return window, sums

    async def extend(self, account: Account, admission: Admission,
                     generated_tokens: int) -> None:
        limits, now = account.limits, time.monotonic()
        _, sums = self._window(account.id, now)
        if limits.generated_tokens_per_minute and exceeds(
                int(sums[1]), generated_tokens, limits.generated_tokens_per_minute,
                counts=False):
            raise RateLimited("generated_tokens", 1, {})
        reserves = budget_reserves(account.budgets, 0, generated_tokens)
        refusal = self.budgets.extend(account.id, admission.holds, reserves, time.time())
        if refusal is not None:
            self.report(account.id, refusal.budget, refusal.used, "refused")
            raise BudgetSpent(refusal.budget, refusal.used, refusal.reserve,
                              refusal.retry_after)
        entry = self._entries.get(admission.record_id)
        if entry is not None and entry[0] >= 0:  # (still in the window)
            entry[2] += generated_tokens
            sums[1] += generated_tokens
        admission.generated_reserved += generated_tokens

    def settle(self, admission: Admission, prompt_tokens: int, generated_tokens: int,
               cached_tokens: int = 0) -> None:
        self.budgets.settle(admission.account, admission.holds, prompt_tokens, cached_tokens,
                            generated_tokens)
        self.concurrent.get(admission.account, set()).discard(admission.record_id)
        entry = self._entries.pop(admission.record_id, None)
        if entry is not None:
            if entry[0] >= 0:  # still in the window: its sums take the real counts
                sums = self.sums[admission.account]
                sums[0] += prompt_tokens - entry[1]
                sums[1] += generated_tokens - entry[2]
            entry[1], entry[2] = float(prompt_tokens), float(generated_tokens)

    async def spent(self, account: str, budgets: list[Budget]) -> list[Spent]:
        now = time.time()
        return [Spent(budget, *window(budget.window, now),
                      *self.budgets.spent(account, budget, now)) for budget in budgets]
