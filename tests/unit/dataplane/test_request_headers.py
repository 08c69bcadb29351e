"""Request headers Fireworks clients send: `fireworks-deployment` pins a deployment while the
body keeps the model id, through the gateway to the pinned deployment's worker."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from tests.unit.fake_worker import MODEL
from tests.unit.harness import Harness, build, registry

COMPLETION = {"id": "c", "object": "text_completion", "created": 1,
              "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3},
              "choices": [{"index": 0, "text": "hi", "finish_reason": "stop"}]}


def three(urls: dict[str, str]) -> dict[str, Any]:
    return registry((), deployments=[
            {"id": "d-a", "account": "fireworks", "model": MODEL, "default": True,
             "replicas": [{"url": urls["a"]}]},
            {"id": "d-b", "account": "fireworks", "model": MODEL,
             "replicas": [{"url": urls["b"]}]},
            {"id": "other", "account": "fireworks", "model": "accounts/fireworks/models/o",
             "replicas": [{"url": urls["b"]}]}])


def app(tmp_path: Path) -> Harness:
    return build(tmp_path, lambda r: httpx.Response(200, json=COMPLETION), hosts=("a", "b"),
                 registry_of=three)


async def post(app: Harness, headers: dict[str, str]) -> httpx.Response:
    return await app.once("POST", "/inference/v1/completions", headers=headers,
                          json={"model": MODEL, "prompt": "x", "max_tokens": 1})


async def test_the_deployment_header_pins_and_the_answer_names_the_model(
        tmp_path: Path) -> None:
    gateway_app = app(tmp_path)
    default = await post(gateway_app, {})
    pinned = await post(gateway_app, {"fireworks-deployment":
                                      "accounts/fireworks/deployments/d-b"})
    assert default.status_code == pinned.status_code == 200
    assert pinned.json()["model"] == MODEL
    assert pinned.headers["fireworks-deployment"] == "accounts/fireworks/deployments/d-b"
    hosts = [r.url.host for r in gateway_app.workers.served.requests]
    assert hosts == ["a", "b"]
    deployments = [r.deployment for r in gateway_app.gateway.ledger.kept]
    assert deployments == ["accounts/fireworks/deployments/d-a",
                           "accounts/fireworks/deployments/d-b"]


async def test_a_pin_that_does_not_serve_the_model_is_not_found(tmp_path: Path) -> None:
    gateway_app = app(tmp_path)
    for pin in ("accounts/fireworks/deployments/other", "accounts/fireworks/deployments/no"):
        response = await post(gateway_app, {"fireworks-deployment": pin})
        assert response.status_code == 404 and pin in response.json()["error"]["message"]
    assert gateway_app.workers.served.requests == []


async def test_every_request_to_a_worker_carries_the_workers_key(tmp_path: Path) -> None:
    """The workers' key (a mounted Secret) goes on the request, on the lookups beside it
    (the served model's name, tokenize) and on the health checks; never the client's key."""
    key_file = tmp_path / "worker-key"
    key_file.write_text("w0rker-key\n")

    def worker(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "served", "parent": None}]})
        if request.url.path == "/tokenize":
            return httpx.Response(200, json={"tokens": [1], "count": 1,
                                             "max_model_len": 100})
        return httpx.Response(200, json=COMPLETION)

    h = build(tmp_path, worker, worker_api_key_file=key_file)
    response = await h.once("POST", "/inference/v1/completions", json={
        "model": MODEL, "prompt": "x", "context_length_exceeded_behavior": "error"})
    assert response.status_code == 200, response.text
    assert h.workers is not None
    seen = {r.url.path: r.headers.get("authorization") for r in h.workers.served.requests}
    assert seen == {"/tokenize": "Bearer w0rker-key", "/v1/completions": "Bearer w0rker-key"}
    await h.gateway.queries.served_model(h.urls["worker"])
    assert h.workers.served.requests[-1].headers["authorization"] == "Bearer w0rker-key"
