"""The account listing, read-only, in Fireworks' control-plane shape: an account's models
(`GET /v1/accounts/<a>/models`, `.../models/<m>`), deployments
(`GET /v1/accounts/<a>/deployments`) and routers (`GET /v1/accounts/<a>/routers`,
`.../routers/<r>`), as `fireworks-ai`'s `models.list(account_id=...)` reads
them. Pure: the registry and the caller's account in, pages out.

What a key sees is what it may use: its own account's, and public accounts'. Any other
account reads exactly like one that does not exist (404).
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from gateway.controlplane.registry import Account, Deployment, Registry, Router
from gateway.errors import GatewayError

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 200


def _visible_account(registry: Registry, caller: Account, account_id: str) -> None:
    if account_id != caller.id and account_id not in registry.public_accounts:
        raise GatewayError(404, f"Account not found: accounts/{account_id}")


def _state(deployment: Deployment) -> str:
    return "READY" if deployment.state == "ready" else "UPDATING"


def models_of(registry: Registry, caller: Account, account_id: str) -> list[dict[str, Any]]:
    """The account's models served on deployments the caller can see, sorted by name."""
    _visible_account(registry, caller, account_id)
    prefix = f"accounts/{account_id}/models/"
    deployments = [d for d in registry.visible_deployments(caller)
                   if d.model.startswith(prefix)]
    loras = [x for x in registry.visible_loras(caller) if x.account == account_id]
    with_loras = {base.name for x in registry.visible_loras(caller)
                  if (base := registry.base_of(x)) is not None}
    public = account_id in registry.public_accounts
    out: dict[str, dict[str, Any]] = {}
    for deployment in deployments:
        entry = out.setdefault(deployment.model, {
            "name": deployment.model, "displayName": deployment.model.removeprefix(prefix),
            "state": "READY", "public": public, "supportsServerless": False,
            "kind": "EMBEDDING_MODEL" if deployment.task == "embed" else "HF_BASE_MODEL",
            "supportsTools": False, "supportsLora": False, "deployedModelRefs": []})
        if deployment.context_length is not None:
            entry["contextLength"] = max(entry.get("contextLength", 0),
                                         deployment.context_length)
        entry["supportsTools"] |= deployment.tool_parser is not None
        entry["supportsLora"] |= deployment.name in with_loras
        entry["deployedModelRefs"].append(
            _deployed(deployment.account, deployment.id, deployment, deployment.default,
                      public))
    for lora in loras:
        base = registry.base_of(lora)
        if base is None:
            continue
        out[lora.model] = {
            "name": lora.model, "displayName": lora.id, "state": "READY", "public": public,
            "kind": "HF_PEFT_ADDON", "supportsServerless": False,
            "supportsTools": base.tool_parser is not None, "supportsLora": False,
            "peftDetails": {"baseModel": base.model},
            "deployedModelRefs": [_deployed(lora.account, lora.id, base, True, public)]}
        if base.context_length is not None:
            out[lora.model]["contextLength"] = base.context_length
    return [out[name] for name in sorted(out)]


def _deployed(account: str, ref_id: str, deployment: Deployment, default: bool,
              public: bool) -> dict[str, Any]:
    """A model's place on a deployment (Fireworks' deployedModelRef)."""
    return {"name": f"accounts/{account}/deployedModels/{ref_id}",
            "deployment": deployment.name, "state": "DEPLOYED", "default": default,
            "public": public}


def model_of(registry: Registry, caller: Account, account_id: str,
             model_id: str) -> dict[str, Any]:
    return _named(models_of(registry, caller, account_id), "Model",
                  f"accounts/{account_id}/models/{model_id}")


def _named(items: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    """The listed item of that name; 404 when the caller sees none."""
    found = next((item for item in items if item["name"] == name), None)
    if found is None:
        raise GatewayError(404, f"{kind} not found: {name}")
    return found


def deployments_of(registry: Registry, caller: Account,
                   account_id: str) -> list[dict[str, Any]]:
    """The account's deployments the caller can see, sorted by name."""
    _visible_account(registry, caller, account_id)
    out = []
    for deployment in sorted(registry.visible_deployments(caller), key=lambda d: d.name):
        if deployment.account != account_id:
            continue
        entry: dict[str, Any] = {
            "name": deployment.name, "displayName": deployment.id,
            "baseModel": deployment.model, "state": _state(deployment),
            "replicaCount": len(deployment.replicas),
            "desiredReplicaCount": len(deployment.replicas)}
        if deployment.context_length is not None:
            entry["maxContextLength"] = deployment.context_length
        out.append(entry)
    return out


def routers_of(registry: Registry, caller: Account, account_id: str) -> list[dict[str, Any]]:
    """The account's routers the caller can see, sorted by name, each with its deployments
    (weights, strategy) as the registry holds them."""
    _visible_account(registry, caller, account_id)
    return [_router(r, [f for f in r.fallbacks if registry.visible(caller, f.split("/")[1])])
            for r in sorted(registry.visible_routers(caller), key=lambda r: r.name)
            if r.account == account_id]


def router_of(registry: Registry, caller: Account, account_id: str,
              router_id: str) -> dict[str, Any]:
    return _named(routers_of(registry, caller, account_id), "Router",
                  f"accounts/{account_id}/routers/{router_id}")


def _router(router: Router, fallbacks: list[str]) -> dict[str, Any]:
    """`fallbacks`: those the caller may see (another account's names are not shown)."""
    return {"name": router.name, "displayName": router.id, "model": router.model,
            "strategy": router.strategy.upper().replace("-", "_"), "default": router.default,
            "deployments": [{"deployment": f"accounts/{router.account}/deployments/"
                                           f"{m.deployment}", "weight": m.weight}
                            for m in router.deployments],
            "fallbacks": fallbacks}


def page(items: list[dict[str, Any]], key: str, page_size: int | None,
         page_token: str | None) -> dict[str, Any]:
    """One page: `pageSize` (default 50, at most 200) items from `pageToken` (what the
    previous page's `nextPageToken` said), and the next page's token while any remain."""
    size = DEFAULT_PAGE_SIZE if not page_size or page_size < 0 else min(page_size,
                                                                        MAX_PAGE_SIZE)
    start = 0
    if page_token:
        try:
            start = int(base64.urlsafe_b64decode(page_token.encode()).decode())
        except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
            raise GatewayError(400, "pageToken is not one this listing gave",
                               param="pageToken") from exc
        if not 0 <= start <= len(items):
            raise GatewayError(400, "pageToken is not one this listing gave",
                               param="pageToken")
    end = start + size
    body: dict[str, Any] = {key: items[start:end], "totalSize": len(items)}
    if end < len(items):
        body["nextPageToken"] = base64.urlsafe_b64encode(str(end).encode()).decode()
    return body
