"""Token budgets per account over a UTC day or a UTC month, beside the per-minute limits.

A budget counts the tokens of an account's requests, each kind with its weight: prompt
tokens not cached (`input_weight`), cached prompt tokens (`cached_weight`, e.g. 0.5) and
generated ones (`output_weight`); an input-only budget weighs output 0, and so on. A request's
cost is the weighted sum, rounded up to a whole token.

Admission reserves the most the request can cost (its prompt estimate at the larger prompt
weight, and max_tokens x n generated) and admits it only while the window's spend plus that
reservation fits the budget; the request's end settles the reservation to its real cost. With
Redis both are steps of the limits' own scripts (redis_limits.py ADMIT_LUA, redis_ledger.py
SETTLE_LUA), so every gateway replica together admits exactly the budget, on Redis' clock. A
`shadow` budget refuses nothing: what it would have refused is counted and logged.

This module is the pure part: the budget's schema, its arithmetic, its windows (in Python and
in Lua, which must agree: tests/unit/controlplane/test_budgets.py), and the in-process
budgets of a gateway without Redis.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Window = Literal["day", "month"]
DAY = 86_400
# A window's key outlives the window by a day, so that its last requests settle into it.
KEPT_AFTER = DAY


class Budget(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,31}$")  # in metrics and Redis keys
    window: Window
    tokens: int = Field(gt=0, le=1 << 50)  # what the window may spend, weighted
    input_weight: float = Field(default=1.0, ge=0, le=1000)  # prompt tokens not cached
    cached_weight: float = Field(default=1.0, ge=0, le=1000)  # cached prompt tokens
    output_weight: float = Field(default=1.0, ge=0, le=1000)  # generated tokens
    shadow: bool = False  # count what would be refused; refuse nothing

    def cost(self, prompt: int, cached: int, completion: int) -> int:
        """A finished request's cost: its tokens weighed, rounded up."""
        cached = min(max(cached, 0), prompt)
        return _up(self.input_weight * (prompt - cached) + self.cached_weight * cached
                   + self.output_weight * completion)

    def reservation(self, prompt: int, generated: int) -> int:
        """The most a request can cost: none of its prompt is assumed cached."""
        return _up(max(self.input_weight, self.cached_weight) * prompt
                   + self.output_weight * generated)


def _up(tokens: float) -> int:
    """Rounded up to a whole token, but not for a float's error (1.1 x 100 is
    110.00000000000001, which costs 110)."""
    nearest = round(tokens)
    if abs(tokens - nearest) <= 1e-9 * max(1.0, abs(tokens)):
        return int(nearest)
    return math.ceil(tokens)


def named_once(budgets: list[Budget]) -> list[Budget]:
    """An account's budgets, whose names must differ (they key its windows)."""
    names = [budget.name for budget in budgets]
    if len(set(names)) != len(names):
        raise ValueError(f"budget names must be unique: {names}")
    return budgets


def window(kind: Window, now: float) -> tuple[str, int]:
    """The UTC window holding `now`: its id (YYYYMMDD or YYYYMM) and when it ends."""
    day = datetime.fromtimestamp(int(now) // DAY * DAY, UTC)
    if kind == "day":
        return day.strftime("%Y%m%d"), int(day.timestamp()) + DAY
    following = datetime(day.year + day.month // 12, day.month % 12 + 1, 1, tzinfo=UTC)
    return day.strftime("%Y%m"), int(following.timestamp())


# The same windows on Redis' clock: `window(kind, now)` -> id, end. Days to a civil date and
# back by H. Hinnant's algorithms (proleptic Gregorian, integer arithmetic only).
WINDOW_LUA = """
local function civil(days)
  local z = days + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
    - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local d = doy - math.floor((153 * mp + 2) / 5) + 1
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  return y, m, d
end
local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local mp = m > 2 and m - 3 or m + 9
  local doy = math.floor((153 * mp + 2) / 5) + d - 1
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end
local function window(kind, now)
  local days = math.floor(now / 86400)
  local y, m, d = civil(days)
  if kind == 'day' then
    return string.format('%04d%02d%02d', y, m, d), (days + 1) * 86400
  end
  local ny, nm = y, m + 1
  if nm == 13 then ny, nm = y + 1, 1 end
  return string.format('%04d%02d', y, m), days_from_civil(ny, nm, 1) * 86400
end
"""


def budget_key(prefix: str, account: str, name: str) -> str:
    """The key prefix of an account's budget; a window's hash is this + the window's id
    (fields `used`: spent and reserved in flight; `refused`; `shadow`: would have
    refused)."""
    return f"{prefix}budget:{account}:{name}:"


@dataclass(slots=True)
class Hold:
    """One budget's part of an admitted request."""

    budget: Budget
    window: str  # "": admitted without Redis; counted in the window current at settlement
    reserved: int = 0
    used: int = 0  # the window's spend once admitted, reservations in flight included


@dataclass(slots=True)
class Refusal:
    """A budget that refuses a request: its spend, the reservation, and the seconds to the
    window's end (the retry-after)."""

    budget: Budget
    used: int
    reserve: int
    retry_after: int


def refuses(budget: Budget, used: int, reserve: int) -> bool:
    """Whether the window, with `used` spent, refuses a reservation (ADMIT_LUA's rule)."""
    return used + reserve > budget.tokens


class LocalBudgets:
    """The budgets of one gateway without Redis: the same rules, in process."""

    def __init__(self) -> None:
        self.used: dict[tuple[str, str, str], int] = {}  # (account, budget, window) -> used
        self.refused: dict[tuple[str, str, str], int] = {}
        self.shadow: dict[tuple[str, str, str], int] = {}

    def admit(self, account: str, budgets: list[Budget], reserves: list[int],
              now: float) -> list[Hold] | Refusal:
        """The holds of an admitted request, or the first budget that refuses it."""
        holds = []
        for budget, reserve in zip(budgets, reserves, strict=True):
            window_id, ends = window(budget.window, now)
            key = (account, budget.name, window_id)
            used = self.used.get(key, 0)
            if refuses(budget, used, reserve) and not budget.shadow:
                self.refused[key] = self.refused.get(key, 0) + 1
                return Refusal(budget, used, reserve, ends - int(now))
            holds.append(Hold(budget, window_id, reserve, used + reserve))
        if any((account, h.budget.name, h.window) not in self.used for h in holds):
            self._forget_before(now)  # a new window: the ended ones go
        for hold in holds:
            key = (account, hold.budget.name, hold.window)
            if refuses(hold.budget, hold.used - hold.reserved, hold.reserved):
                self.shadow[key] = self.shadow.get(key, 0) + 1
            self.used[key] = hold.used
        return holds

    def extend(self, account: str, holds: list[Hold], reserves: list[int],
               now: float) -> Refusal | None:
        """More reserved in each hold's window; the first budget that refuses, if any."""
        for hold, reserve in zip(holds, reserves, strict=True):
            used = self.used.get((account, hold.budget.name, hold.window), 0)
            if refuses(hold.budget, used, reserve) and not hold.budget.shadow:
                key = (account, hold.budget.name, hold.window)
                self.refused[key] = self.refused.get(key, 0) + 1
                ends = window(hold.budget.window, now)[1]
                return Refusal(hold.budget, used, reserve, ends - int(now))
        for hold, reserve in zip(holds, reserves, strict=True):
            key = (account, hold.budget.name, hold.window)
            hold.used = self.used[key] = self.used.get(key, 0) + reserve
            hold.reserved += reserve
        return None

    def settle(self, account: str, holds: list[Hold], prompt: int, cached: int,
               completion: int) -> None:
        for hold in holds:
            key = (account, hold.budget.name, hold.window)
            if key in self.used:
                self.used[key] += hold.budget.cost(prompt, cached, completion) - hold.reserved

    def spent(self, account: str, budget: Budget, now: float) -> tuple[int, int, int]:
        """(used, refused, shadow) in the current window."""
        key = (account, budget.name, window(budget.window, now)[0])
        return self.used.get(key, 0), self.refused.get(key, 0), self.shadow.get(key, 0)

    def _forget_before(self, now: float) -> None:
        """Windows that ended more than a day ago (bounded by accounts x budgets x 2)."""
        current = {window(kind, now - KEPT_AFTER)[0] for kind in ("day", "month")}
        current |= {window(kind, now)[0] for kind in ("day", "month")}
        for key in [k for k in self.used if k[2] not in current]:
            self.used.pop(key, None)
            self.refused.pop(key, None)
            self.shadow.pop(key, None)
