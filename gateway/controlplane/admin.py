"""The admin API (`/admin/v1`): deployments and their replicas, API keys, account limits,
usage (routers and budgets: admin_traffic.py). Only the admin key (GATEWAY_ADMIN_KEY) opens
it; an account's key never does. The key is checked at the edge (gateway/server/asgi.py),
before the body is read.

Every change is one `store.change(fn)`: with Redis it is visible to every gateway replica
within `registry_poll_interval`.
"""

from __future__ import annotations

import secrets
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict
from redis.exceptions import RedisError

from gateway.controlplane.limits import Limiter
from gateway.controlplane.registry import (
    Account,
    Deployment,
    DeploymentSettings,
    Limits,
    Lora,
    RegistryData,
    Replica,
    hash_key,
)
from gateway.controlplane.store import RegistryStore
from gateway.controlplane.usage import Ledger
from gateway.errors import GatewayError


class AdapterPlacement(Protocol):
    """Where LoRA adapters are loaded (the data plane's Adapters keeps it)."""

    held: dict[str, set[str]]  # replica URL -> adapters it holds (worker names)

    def wanted(self) -> dict[str, dict[str, Lora]]: ...

    async def sync_all(self) -> None: ...


@dataclass
class AdminParts:
    """What the admin API works on (app.state.admin)."""

    store: RegistryStore
    ledger: Ledger
    adapters: AdapterPlacement
    limiter: Limiter  # budgets' spend


def _parts(request: Request) -> AdminParts:
    parts: AdminParts = request.app.state.admin
    return parts


router = APIRouter()


# A deployment as the admin API takes it: its settings (the path names its account and id).
DeploymentSpec = DeploymentSettings


def _account(data: RegistryData, account_id: str) -> Account:
    for account in data.accounts:
        if account.id == account_id:
            return account
    account = Account(id=account_id)
    data.accounts.append(account)
    return account


def _find(data: RegistryData, account_id: str, deployment_id: str) -> Deployment:
    for deployment in data.deployments:
        if deployment.account == account_id and deployment.id == deployment_id:
            return deployment
    raise GatewayError(404, f"Deployment not found: accounts/{account_id}/deployments/"
                            f"{deployment_id}")


def _put(data: RegistryData, deployment: Deployment) -> None:
    """Insert or replace; a new default takes the flag from the model's other deployments."""
    data.deployments = [d for d in data.deployments
                        if not (d.account == deployment.account and d.id == deployment.id)]
    if deployment.default:
        for other in data.deployments:
            if other.account == deployment.account and other.model == deployment.model:
                other.default = False
    data.deployments.append(deployment)
    _account(data, deployment.account)


def _shown(deployment: Deployment) -> dict[str, Any]:
    return deployment.model_dump(mode="json") | {"name": deployment.name}


@router.get("/registry")
async def registry_status(request: Request) -> dict[str, Any]:
    """Whether the stored registry is the one being served (problem: why not)."""
    store = _parts(request).store
    registry = store.current.data
    return {"problem": store.problem, "accounts": len(registry.accounts),
            "deployments": len(registry.deployments)}


@router.get("/accounts")
async def list_accounts(request: Request) -> dict[str, Any]:
    data = _parts(request).store.current.data
    return {"accounts": [{"id": a.id, "limits": a.limits.model_dump(),
                          "api_keys": len(a.api_keys)} for a in data.accounts]}


@router.get("/accounts/{account_id}/deployments")
async def list_deployments(request: Request, account_id: str) -> dict[str, Any]:
    data = _parts(request).store.current.data
    return {"deployments": [_shown(d) for d in data.deployments if d.account == account_id]}


@router.get("/accounts/{account_id}/deployments/{deployment_id}")
async def get_deployment(request: Request, account_id: str,
                         deployment_id: str) -> dict[str, Any]:
    return _shown(_find(_parts(request).store.current.data, account_id, deployment_id))


@router.put("/accounts/{account_id}/deployments/{deployment_id}")
async def put_deployment(request: Request, account_id: str, deployment_id: str,
                         spec: DeploymentSpec) -> dict[str, Any]:
    deployment = Deployment.model_validate(spec.model_dump() | {"id": deployment_id,
                                                                "account": account_id})

    def change(data: RegistryData) -> RegistryData:
        _put(data, deployment)
        return data

    await _parts(request).store.change(change)
    return _shown(deployment)


@router.patch("/accounts/{account_id}/deployments/{deployment_id}")
async def patch_deployment(request: Request, account_id: str, deployment_id: str,
                           fields: dict[str, Any]) -> dict[str, Any]:
    if {"id", "account"} & fields.keys():
        raise GatewayError(400, "A deployment's id and account are its path; they cannot be "
                                "changed")
    updated: list[Deployment] = []

    def change(data: RegistryData) -> RegistryData:
        current = _find(data, account_id, deployment_id)
        merged = DeploymentSpec.model_validate(
            current.model_dump(exclude={"id", "account"}) | fields)
        deployment = Deployment.model_validate(merged.model_dump() | {
            "id": deployment_id, "account": account_id})
        _put(data, deployment)
        updated.append(deployment)
        return data

    await _parts(request).store.change(change)
    return _shown(updated[-1])


@router.delete("/accounts/{account_id}/deployments/{deployment_id}")
async def delete_deployment(request: Request, account_id: str,
                            deployment_id: str) -> dict[str, Any]:
    def change(data: RegistryData) -> RegistryData:
        gone = _find(data, account_id, deployment_id)
        data.deployments = [d for d in data.deployments if d is not gone]
        return data

    await _parts(request).store.change(change)
    return {"deleted": f"accounts/{account_id}/deployments/{deployment_id}"}


@router.post("/accounts/{account_id}/deployments/{deployment_id}/replicas")
async def add_replica(request: Request, account_id: str, deployment_id: str,
                      replica: Replica) -> dict[str, Any]:
    def change(data: RegistryData) -> RegistryData:
        deployment = _find(data, account_id, deployment_id)
        if all(r.url != replica.url for r in deployment.replicas):
            deployment.replicas.append(replica)
        return data

    registry = await _parts(request).store.change(change)
    return _shown(_find(registry.data, account_id, deployment_id))


class Drain(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str
    draining: bool = True


@router.put("/accounts/{account_id}/deployments/{deployment_id}/replicas/drain")
async def drain_replica(request: Request, account_id: str, deployment_id: str,
                        drain: Drain) -> dict[str, Any]:
    """Drain a replica (no new requests; its streams finish there, or move when its
    worker stops), or (`draining: false`) put it back in rotation."""
    def change(data: RegistryData) -> RegistryData:
        deployment = _find(data, account_id, deployment_id)
        found = [r for r in deployment.replicas if r.url == drain.url]
        if not found:
            raise GatewayError(404, f"No replica {drain.url} in {deployment.name}")
        found[0].draining = drain.draining
        return data

    registry = await _parts(request).store.change(change)
    return _shown(_find(registry.data, account_id, deployment_id))


@router.delete("/accounts/{account_id}/deployments/{deployment_id}/replicas")
async def remove_replica(request: Request, account_id: str, deployment_id: str,
                         url: str) -> dict[str, Any]:
    def change(data: RegistryData) -> RegistryData:
        deployment = _find(data, account_id, deployment_id)
        if all(r.url != url for r in deployment.replicas):
            raise GatewayError(404, f"No replica {url} in {deployment.name}")
        deployment.replicas = [r for r in deployment.replicas if r.url != url]
        return data

    registry = await _parts(request).store.change(change)
    return _shown(_find(registry.data, account_id, deployment_id))


@router.post("/accounts/{account_id}/api-keys")
async def create_api_key(request: Request, account_id: str) -> dict[str, str]:
    """A new key, shown once; the registry keeps only its hash (the key id)."""
    key = "fw_" + secrets.token_urlsafe(24)

    def change(data: RegistryData) -> RegistryData:
        _account(data, account_id).api_keys.append(hash_key(key))
        return data

    await _parts(request).store.change(change)
    return {"api_key": key, "key_id": hash_key(key), "account": account_id}


@router.get("/accounts/{account_id}/api-keys")
async def list_api_keys(request: Request, account_id: str) -> dict[str, list[str]]:
    account = _parts(request).store.current.account(account_id)
    return {"key_ids": list(account.api_keys) if account else []}


@router.delete("/accounts/{account_id}/api-keys/{key_id}")
async def delete_api_key(request: Request, account_id: str, key_id: str) -> dict[str, str]:
    def change(data: RegistryData) -> RegistryData:
        account = _account(data, account_id)
        if key_id not in account.api_keys:
            raise GatewayError(404, f"No such key for account {account_id}")
        account.api_keys = [k for k in account.api_keys if k != key_id]
        return data

    await _parts(request).store.change(change)
    return {"deleted": key_id}


@router.put("/accounts/{account_id}/limits")
async def set_limits(request: Request, account_id: str, limits: Limits) -> dict[str, Any]:
    def change(data: RegistryData) -> RegistryData:
        _account(data, account_id).limits = limits
        return data

    await _parts(request).store.change(change)
    return {"account": account_id, "limits": limits.model_dump()}


class LoraSpec(BaseModel):
    """A LoRA adapter as the admin API takes it: the path names its account and id."""

    model_config = ConfigDict(extra="forbid")
    deployment: str  # the base deployment, in the same account
    source: str  # where its workers read it: a path on their model cache, or a HF id


def _shown_lora(lora: Lora, adapters: AdapterPlacement) -> dict[str, Any]:
    """The adapter, and per replica of its base whether it holds it."""
    holds = {url: lora.worker_name in names for url, names in adapters.held.items()
             if lora.worker_name in adapters.wanted().get(url, {})}
    return lora.model_dump() | {"model": lora.model, "replicas": holds}


@router.get("/accounts/{account_id}/loras")
async def list_loras(request: Request, account_id: str) -> dict[str, Any]:
    parts = _parts(request)
    return {"loras": [_shown_lora(lora, parts.adapters)
                      for lora in parts.store.current.data.loras
                      if lora.account == account_id]}


@router.put("/accounts/{account_id}/loras/{lora_id}")
async def put_lora(request: Request, account_id: str, lora_id: str,
                   spec: LoraSpec) -> dict[str, Any]:
    lora = Lora.model_validate(spec.model_dump() | {"id": lora_id, "account": account_id})
    parts = _parts(request)

    def change(data: RegistryData) -> RegistryData:
        _find(data, account_id, lora.deployment)  # the base must exist: 404 otherwise
        data.loras = [x for x in data.loras if (x.account, x.id) != (account_id, lora_id)]
        data.loras.append(lora)
        return data

    await parts.store.change(change)
    await parts.adapters.sync_all()  # loaded now, not at the next round
    return _shown_lora(lora, parts.adapters)


@router.delete("/accounts/{account_id}/loras/{lora_id}")
async def delete_lora(request: Request, account_id: str, lora_id: str) -> dict[str, str]:
    parts = _parts(request)

    def change(data: RegistryData) -> RegistryData:
        kept = [x for x in data.loras if (x.account, x.id) != (account_id, lora_id)]
        if len(kept) == len(data.loras):
            raise GatewayError(404, f"No LoRA {lora_id} in account {account_id}")
        data.loras = kept
        return data

    await parts.store.change(change)
    await parts.adapters.sync_all()  # unloaded now
    return {"deleted": f"accounts/{account_id}/models/{lora_id}"}


@router.get("/usage")
async def usage(request: Request) -> dict[str, Any]:
    """Every account's totals, and this gateway process's records not yet in them (also
    while Redis is unreachable, when the totals cannot be read: that is when they wait)."""
    ledger = _parts(request).ledger
    pending = asdict(ledger.backlog())
    try:
        return {"accounts": await ledger.totals(), "pending": pending}
    except RedisError:
        return {"accounts": None, "pending": pending,
                "problem": "The shared state store (Redis) is unreachable"}
