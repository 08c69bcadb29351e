"""LoRA adapters on their base deployment, with scripted workers that keep the adapter set
as vLLM's runtime-LoRA endpoints do (load, unload, /v1/models), on real sockets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from gateway.controlplane.registry import (
    LORA_PREFIX,
    Account,
    Lora,
    Registry,
    RegistryData,
    hash_key,
)
from gateway.errors import GatewayError
from tests.unit.fake_worker import FakeWorkers
from tests.unit.harness import Harness, build

KEY, OTHER, ADMIN = "k-lora", "k-other", "admin-lora"
BASE = "accounts/acme/models/base"
TUNED = "accounts/acme/models/tuned"


class Workers:
    """Two workers, each with its own set of loaded adapters."""

    def __init__(self) -> None:
        self.loaded: dict[str, set[str]] = {"w1": set(), "w2": set()}
        self.completions: list[tuple[str, str | None]] = []  # (host, model asked for)

    def handle(self, request: httpx.Request) -> httpx.Response:
        host, path = request.url.host, request.url.path
        held = self.loaded[host]
        if path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "base"}, *(
                {"id": name, "parent": "base"} for name in sorted(held))]})
        body = orjson.loads(request.content) if request.content else {}
        if path == "/v1/load_lora_adapter":
            if body["lora_name"] in held:
                return httpx.Response(400, json={"error": {
                    "message": f"The lora adapter '{body['lora_name']}' has already been "
                               "loaded.", "code": 400}})
            held.add(body["lora_name"])
            return httpx.Response(200, text="Success: LoRA adapter added successfully.")
        if path == "/v1/unload_lora_adapter":
            held.discard(body["lora_name"])
            return httpx.Response(200, text="Success: LoRA adapter removed successfully.")
        model = body.get("model")
        if model is not None and model not in held:
            return httpx.Response(404, json={"error": {"message": f"no model {model}"}})
        self.completions.append((host, model))
        return httpx.Response(200, json={
            "id": "c", "object": "text_completion", "created": 1, "model": model or "base",
            "choices": [{"index": 0, "text": model or "base", "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})


def registry_data(loras: list[dict[str, str]]) -> dict[str, Any]:
    return {
        "accounts": [{"id": "acme", "api_keys": [hash_key(KEY)]},
                     {"id": "other", "api_keys": [hash_key(OTHER)]}],
        "deployments": [{"id": "base-d", "account": "acme", "model": BASE, "default": True,
                         "replicas": [{"url": "http://w1"}, {"url": "http://w2"}]}],
        "loras": loras}


def test_a_lora_resolves_to_its_base_deployment_for_its_account_only() -> None:
    data = RegistryData.model_validate(registry_data([
        {"id": "tuned", "account": "acme", "deployment": "base-d", "source": "/a/tuned"}]))
    registry = Registry(data, public_accounts=())
    acme, other = Account(id="acme"), Account(id="other")
    route = registry.resolve(TUNED, acme)
    assert route.first.id == "base-d" and route.lora is not None
    assert route.lora.model == TUNED and route.lora.worker_name == "fwlora.acme:tuned"
    pinned = registry.resolve(f"{TUNED}#accounts/acme/deployments/base-d", acme)
    assert pinned.lora == route.lora
    assert registry.resolve(BASE, acme).lora is None  # the base model itself
    for ref, account in ((TUNED, other), (f"{TUNED}#accounts/acme/deployments/x", acme)):
        with pytest.raises(GatewayError) as missing:
            registry.resolve(ref, account)
        assert missing.value.status == 404


def over(urls: dict[str, str]) -> dict[str, Any]:
    data = registry_data([])
    data["deployments"][0]["replicas"] = [{"url": urls["w1"]}, {"url": urls["w2"]}]
    return data


def app_over(tmp_path: Path, workers: Workers) -> tuple[Harness, FakeWorkers]:
    h = build(tmp_path, workers.handle, hosts=("w1", "w2"), registry_of=over,
              listed_order=True, admin_key=ADMIN, public_accounts=[])
    assert h.workers is not None
    return h, h.workers


async def test_adapters_are_loaded_routed_to_reloaded_and_unloaded(tmp_path: Path) -> None:
    workers = Workers()
    app, fake = app_over(tmp_path, workers)
    admin = {"Authorization": f"Bearer {ADMIN}"}
    user = {"Authorization": f"Bearer {KEY}"}
    async with app.running() as client:
        added = await client.put("/admin/v1/accounts/acme/loras/tuned", headers=admin,
                                 json={"deployment": "base-d", "source": "/models/tuned"})
        assert added.status_code == 200, added.text
        assert workers.loaded == {"w1": {"fwlora.acme:tuned"}, "w2": {"fwlora.acme:tuned"}}
        assert set(added.json()["replicas"].values()) == {True}
        for _ in range(4):
            served = await client.post("/v1/completions", headers=user,
                                       json={"model": TUNED, "prompt": "x"})
            assert served.status_code == 200, served.text
            assert served.json()["choices"][0]["text"] == "fwlora.acme:tuned"
            assert served.json()["model"] == TUNED
        base = await client.post("/v1/completions", headers=user,
                                 json={"model": BASE, "prompt": "x"})
        assert base.json()["choices"][0]["text"] == "base"  # the base is unchanged
        records = app.gateway.ledger.kept
        assert [r.model for r in records] == [TUNED] * 4 + [BASE]  # usage names the adapter
        listed = (await client.get("/v1/models", headers=user)).json()["data"]
        assert {"id": TUNED, "parent": BASE} in [
            {k: m.get(k) for k in ("id", "parent")} for m in listed]
        # A replica that restarted has lost its adapters: requests go to the one that holds
        # it, and the next sync loads it again.
        workers.loaded["w1"].clear()
        await app.gateway.adapters.sync_all()
        assert workers.loaded["w1"] == {"fwlora.acme:tuned"}
        # Both restarted between syncs: the request waits for the load on its replica.
        for host in ("w1", "w2"):
            workers.loaded[host].clear()
            app.gateway.adapters.held[fake.urls[host]].clear()
        served = await client.post("/v1/completions", headers=user,
                                   json={"model": TUNED, "prompt": "x"})
        assert served.status_code == 200, served.text
        assert workers.loaded["w1"] == {"fwlora.acme:tuned"}
        # Both restarted, and the gateway has not looked yet: the worker's 404 for the
        # adapter makes it load it there and ask again; the client sees nothing of it.
        for host in ("w1", "w2"):
            workers.loaded[host].clear()
        served = await client.post("/v1/completions", headers=user,
                                   json={"model": TUNED, "prompt": "x"})
        assert served.status_code == 200, served.text
        assert served.json()["choices"][0]["text"] == "fwlora.acme:tuned"
        # Other accounts do not see it.
        other = await client.post("/v1/completions", headers={"Authorization": f"Bearer {OTHER}"},
                                  json={"model": TUNED, "prompt": "x"})
        assert other.status_code == 404
        removed = await client.delete("/admin/v1/accounts/acme/loras/tuned", headers=admin)
        assert removed.status_code == 200
        assert workers.loaded == {"w1": set(), "w2": set()}
        gone = await client.post("/v1/completions", headers=user,
                                 json={"model": TUNED, "prompt": "x"})
        assert gone.status_code == 404
        missing_base = await client.put("/admin/v1/accounts/acme/loras/x", headers=admin,
                                        json={"deployment": "nope", "source": "/m"})
        assert missing_base.status_code == 404
    assert all(model in (None, "fwlora.acme:tuned") for _, model in workers.completions)


def test_lora_records_validate() -> None:
    with pytest.raises(ValueError):
        Lora(id="a/b", account="acme", deployment="d", source="/x")
    with pytest.raises(ValueError):
        Lora(id="ok", account="acme", deployment="d", source="")


def test_adapter_names_never_collide_across_accounts() -> None:
    one = Lora(id="b.c", account="a", deployment="d", source="/x")
    other = Lora(id="c", account="a.b", deployment="d", source="/y")
    assert one.worker_name != other.worker_name
    assert one.worker_name.startswith(LORA_PREFIX)
