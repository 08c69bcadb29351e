"""The account listing through the `fireworks-ai` SDK as its users call it
(`models.list(account_id=...)`, `models.get`, `deployments.list`), paging included, with the
key's visibility rules."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import fireworks
import pytest

from gateway.controlplane import listing
from gateway.controlplane.registry import Account, Registry, RegistryData
from tests.unit.harness import build, registry

ACME_KEY = "k-acme"


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[fireworks.AsyncFireworks]:
    replica = [{"url": "http://127.0.0.1:9"}]
    accounts = {"fireworks": "k-fw", "acme": ACME_KEY, "other": "k-other"}
    content = registry((), accounts=accounts, deployments=[
            {"id": "d1", "account": "fireworks", "model": "accounts/fireworks/models/m1",
             "default": True, "tool_parser": "hermes", "replicas": replica},
            {"id": "d2", "account": "acme", "model": "accounts/acme/models/m2",
             "default": True, "context_length": 4096, "replicas": replica * 2},
            {"id": "d2b", "account": "acme", "model": "accounts/acme/models/m2",
             "context_length": 8192, "replicas": replica},
            {"id": "emb", "account": "acme", "model": "accounts/acme/models/embedder",
             "task": "embed", "default": True, "replicas": replica},
            {"id": "hidden", "account": "other", "model": "accounts/other/models/secret",
             "replicas": replica}],
    )
    content["loras"] = [{"id": "tuned", "account": "acme", "deployment": "d2", "source": "/a"}]
    async with build(tmp_path, registry_of=content).running() as http:
        yield fireworks.AsyncFireworks(api_key=ACME_KEY, base_url="http://gw",
                                       http_client=http, max_retries=0)


async def names(pages: Any) -> list[str]:
    return [item.name async for item in pages]


async def test_models_list_pages_through_the_accounts_models(
        client: fireworks.AsyncFireworks) -> None:
    expected = ["accounts/acme/models/embedder", "accounts/acme/models/m2",
                "accounts/acme/models/tuned"]
    assert await names(client.models.list(account_id="acme")) == expected
    # one per page: the SDK follows nextPageToken
    assert await names(client.models.list(account_id="acme", page_size=1)) == expected
    first = await client.models.list(account_id="acme", page_size=2)
    assert len(first.models) == 2 and first.next_page_token


async def test_a_model_in_the_control_plane_shape(client: fireworks.AsyncFireworks) -> None:
    model = await client.models.get("m2", account_id="acme")
    assert model.kind == "HF_BASE_MODEL" and model.state == "READY"
    assert model.context_length == 8192 and model.supports_lora and not model.supports_tools
    assert model.deployed_model_refs is not None
    assert [(r.deployment, r.default) for r in model.deployed_model_refs] == [
        ("accounts/acme/deployments/d2", True), ("accounts/acme/deployments/d2b", False)]
    adapter = await client.models.get("tuned", account_id="acme")
    assert adapter.kind == "HF_PEFT_ADDON"
    assert (await client.models.get("embedder", account_id="acme")).kind == "EMBEDDING_MODEL"
    public = await client.models.get("m1", account_id="fireworks")
    assert public.supports_tools and public.public


async def test_deployments_list(client: fireworks.AsyncFireworks) -> None:
    deployments = [d async for d in client.deployments.list(account_id="acme")]
    assert [(d.name, d.base_model, d.replica_count) for d in deployments] == [
        ("accounts/acme/deployments/d2", "accounts/acme/models/m2", 2),
        ("accounts/acme/deployments/d2b", "accounts/acme/models/m2", 1),
        ("accounts/acme/deployments/emb", "accounts/acme/models/embedder", 1)]


async def test_other_accounts_read_as_missing(client: fireworks.AsyncFireworks) -> None:
    for call in (lambda: client.models.list(account_id="other"),
                 lambda: client.models.get("secret", account_id="other"),
                 lambda: client.deployments.list(account_id="other"),
                 lambda: client.models.get("nope", account_id="acme"),
                 lambda: client.models.list(account_id="nobody")):
        with pytest.raises(fireworks.NotFoundError):
            await call()


async def test_bad_page_tokens_and_sizes_are_400(client: fireworks.AsyncFireworks) -> None:
    for query in ({"pageToken": "not-a-token"}, {"pageToken": "OTk5"},  # offset 999
                  {"pageSize": "many"}):
        with pytest.raises(fireworks.BadRequestError):
            await client.models.list(account_id="acme", extra_query=query)
    many = await client.models.list(account_id="acme", page_size=10_000)  # capped at 200
    assert len(many.models) == 3 and not many.next_page_token


def test_a_public_routers_fallbacks_name_no_private_target() -> None:
    data = RegistryData.model_validate({
        "accounts": [{"id": "fireworks"}, {"id": "acme"}, {"id": "other"}],
        "deployments": [{"id": "d", "account": "fireworks", "model": "m"}],
        "routers": [{"id": "r", "account": "fireworks", "model": "m",
                     "deployments": [{"deployment": "d"}],
                     "fallbacks": ["accounts/acme/deployments/secret",
                                   "accounts/fireworks/deployments/d"]}]})
    registry_ = Registry(data)
    for caller, shown in (("acme", ["accounts/acme/deployments/secret",
                                    "accounts/fireworks/deployments/d"]),
                          ("other", ["accounts/fireworks/deployments/d"])):
        (router,) = listing.routers_of(registry_, Account(id=caller), "fireworks")
        assert router["fallbacks"] == shown
