"""The admin API's routers and budgets (`/admin/v1`, behind the admin key like the rest of
admin.py): an account's routers over its deployments, and its token budgets with what each
has spent in its current window.

Every change is one `store.change(fn)`, visible to every gateway replica within
`registry_poll_interval`; spend is read from the limiter (Redis, shared by all of them).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator
from redis.exceptions import RedisError

from gateway.controlplane.admin import AdminParts, _account, _parts
from gateway.controlplane.budgets import Budget, named_once
from gateway.controlplane.limits import Spent
from gateway.controlplane.registry import RegistryData, Router, RouterSettings, Target
from gateway.errors import GatewayError

router = APIRouter()


def _shown(found: Router) -> dict[str, Any]:
    return found.model_dump(mode="json") | {"name": found.name}


def _find(data: RegistryData, account_id: str, router_id: str) -> Router:
    for found in data.routers:
        if found.account == account_id and found.id == router_id:
            return found
    raise GatewayError(404, f"Router not found: accounts/{account_id}/routers/{router_id}")


@router.get("/accounts/{account_id}/routers")
async def list_routers(request: Request, account_id: str) -> dict[str, Any]:
    data = _parts(request).store.current.data
    return {"routers": [_shown(r) for r in data.routers if r.account == account_id]}


@router.get("/accounts/{account_id}/routers/{router_id}")
async def get_router(request: Request, account_id: str, router_id: str) -> dict[str, Any]:
    return _shown(_find(_parts(request).store.current.data, account_id, router_id))


@router.put("/accounts/{account_id}/routers/{router_id}")
async def put_router(request: Request, account_id: str, router_id: str,
                     spec: RouterSettings) -> dict[str, Any]:
    """Create or replace. Its deployments must exist in the account; a default router takes
    the flag from the model's other routers and deployments of the account."""
    made = Router.model_validate(spec.model_dump() | {"id": router_id, "account": account_id})

    def change(data: RegistryData) -> RegistryData:
        ids = {d.id for d in data.deployments if d.account == account_id}
        missing = [m.deployment for m in made.deployments if m.deployment not in ids]
        if missing:
            raise GatewayError(404, f"Deployments not found in account {account_id}: "
                                    f"{', '.join(missing)}")
        data.routers = [r for r in data.routers if (r.account, r.id) != (account_id,
                                                                           router_id)]
        if made.default:
            others: list[Target] = [*data.routers, *data.deployments]
            for other in others:
                if other.account == account_id and other.model == made.model:
                    other.default = False
        data.routers.append(made)
        _account(data, account_id)
        return data

    await _parts(request).store.change(change)
    return _shown(made)


@router.delete("/accounts/{account_id}/routers/{router_id}")
async def delete_router(request: Request, account_id: str, router_id: str) -> dict[str, str]:
    def change(data: RegistryData) -> RegistryData:
        gone = _find(data, account_id, router_id)
        data.routers = [r for r in data.routers if r is not gone]
        return data

    await _parts(request).store.change(change)
    return {"deleted": f"accounts/{account_id}/routers/{router_id}"}


class Budgets(BaseModel):
    model_config = ConfigDict(extra="forbid")
    budgets: list[Budget] = Field(max_length=8)

    _named_once = field_validator("budgets")(named_once)


def _spent(spent: Spent) -> dict[str, Any]:
    budget = spent.budget
    return budget.model_dump() | {
        "current_window": spent.window, "resets_at": spent.resets_at, "spent": spent.used,
        "remaining": max(budget.tokens - spent.used, 0), "refused": spent.refused,
        "shadow_refused": spent.shadow}


async def _shown_budgets(parts: AdminParts, account_id: str) -> dict[str, Any]:
    account = parts.store.current.account(account_id)
    budgets = account.budgets if account is not None else []
    try:
        spent = await parts.limiter.spent(account_id, budgets)
    except (RedisError, OSError):
        return {"account": account_id, "budgets": [b.model_dump() for b in budgets],
                "problem": "The shared state store (Redis) is unreachable"}
    return {"account": account_id, "budgets": [_spent(s) for s in spent]}


@router.get("/accounts/{account_id}/budgets")
async def get_budgets(request: Request, account_id: str) -> dict[str, Any]:
    """The account's budgets, each with its current window's spend (reservations of
    requests in flight included), what it refused, and what it would have (shadow)."""
    return await _shown_budgets(_parts(request), account_id)


@router.put("/accounts/{account_id}/budgets")
async def put_budgets(request: Request, account_id: str, body: Budgets) -> dict[str, Any]:
    """Replace the account's budgets (an empty list removes them). A budget kept under the
    same name keeps its window's spend."""
    parts = _parts(request)

    def change(data: RegistryData) -> RegistryData:
        _account(data, account_id).budgets = body.budgets
        return data

    await parts.store.change(change)
    return await _shown_budgets(parts, account_id)
