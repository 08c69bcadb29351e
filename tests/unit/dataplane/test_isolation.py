"""Isolation on the shared path, for every API in the route table (present and future): each
worker request carries its account's prefix-cache salt, set by the data plane, and nothing a
client names (a salt of its own, another account's, a priority, KV-transfer parameters)
reaches a worker; the client gets a 400 naming the field, or the field goes no further."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from gateway.app import inference_apis
from gateway.controlplane.responses import LocalResponses
from gateway.dataplane.isolation import account_salt
from tests.unit.fake_worker import MODEL
from tests.unit.harness import EMBEDDER, Harness, build, with_embedder

MESSAGES = [{"role": "user", "content": "hi"}]
# A minimal valid request per API path; an API added to the route table needs one here.
BODIES: dict[str, dict[str, Any]] = {
    "/chat/completions": {"model": MODEL, "messages": MESSAGES},
    "/completions": {"model": MODEL, "prompt": "hi"},
    "/embeddings": {"model": EMBEDDER, "input": "hi"},
    "/messages": {"model": MODEL, "max_tokens": 4, "messages": MESSAGES},
    "/messages/count_tokens": {"model": MODEL, "messages": MESSAGES},
    "/responses": {"model": MODEL, "input": "hi"},
    "/rerank": {"model": EMBEDDER, "query": "q", "documents": ["a"]},
}
HOSTILE = {"cache_salt": account_salt("victim", ""), "priority": -100,
           "kv_transfer_params": {"do_remote_decode": True}}
PATHS = sorted(BODIES)


def worker(request: httpx.Request) -> httpx.Response:
    if request.url.path == "/v1/models":
        return httpx.Response(200, json={"data": [{"id": "served", "parent": None}]})
    return httpx.Response(500, json={"error": "only the request is looked at"})


@pytest.fixture
def gateway(tmp_path: Path) -> Harness:
    return build(tmp_path, worker, registry_of=with_embedder, eject_after_failures=1000)


def test_every_api_in_the_route_table_has_a_request_here() -> None:
    assert {api.path for api in inference_apis(LocalResponses(60))} == set(BODIES)


def sent(gateway: Harness) -> list[dict[str, Any]]:
    assert gateway.workers is not None
    return [orjson.loads(r.content) for r in gateway.workers.served.requests
            if r.method == "POST"]


@pytest.mark.parametrize("path", PATHS)
async def test_every_worker_request_carries_its_accounts_salt(gateway: Harness,
                                                              path: str) -> None:
    await gateway.once("POST", f"/inference/v1{path}", json=BODIES[path])
    (body,) = sent(gateway)
    assert body["cache_salt"] == account_salt("fireworks", "")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", sorted(HOSTILE))
async def test_no_client_named_engine_field_reaches_a_worker(gateway: Harness, path: str,
                                                             name: str) -> None:
    response = await gateway.once("POST", f"/inference/v1{path}",
                                  json=BODIES[path] | {name: HOSTILE[name]})
    if response.status_code == 400:  # refused, naming the field: nothing was sent
        assert name in response.text and sent(gateway) == []
        return
    (body,) = sent(gateway)
    assert body["cache_salt"] == account_salt("fireworks", "")
    assert body.get(name) != HOSTILE[name]
