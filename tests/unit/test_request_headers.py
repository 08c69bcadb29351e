"""Request headers Fireworks clients send: `fireworks-deployment` pins a deployment while the
body keeps the model id, through the gateway to the pinned deployment's worker."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import yaml

from gateway.app import create_app
from gateway.config import Settings
from gateway.controlplane.registry import hash_key
from tests.unit.fake_worker import KEY, MODEL, FakeWorkers

COMPLETION = {"id": "c", "object": "text_completion", "created": 1,
              "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3},
              "choices": [{"index": 0, "text": "hi", "finish_reason": "stop"}]}


def app(tmp_path: Path) -> Any:
    workers = FakeWorkers(lambda r: httpx.Response(200, json=COMPLETION), hosts=("a", "b"))
    registry = tmp_path / "registry.yaml"
    registry.write_text(yaml.safe_dump({
        "accounts": [{"id": "fireworks", "api_keys": [hash_key(KEY)]}],
        "deployments": [
            {"id": "d-a", "account": "fireworks", "model": MODEL, "default": True,
             "replicas": [{"url": workers.urls["a"]}]},
            {"id": "d-b", "account": "fireworks", "model": MODEL,
             "replicas": [{"url": workers.urls["b"]}]},
            {"id": "other", "account": "fireworks", "model": "accounts/fireworks/models/o",
             "replicas": [{"url": workers.urls["b"]}]}]}))
    gateway_app = create_app(Settings(registry_path=registry, health_check_interval=0))
    gateway_app.workers = workers
    return gateway_app


async def post(app: Any, headers: dict[str, str]) -> httpx.Response:
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
        return await client.post("/inference/v1/completions",
                                 json={"model": MODEL, "prompt": "x", "max_tokens": 1},
                                 headers={"authorization": f"Bearer {KEY}"} | headers)


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
    deployments = [r.deployment for r in gateway_app.state.gateway.ledger.kept]
    assert deployments == ["accounts/fireworks/deployments/d-a",
                           "accounts/fireworks/deployments/d-b"]


async def test_a_pin_that_does_not_serve_the_model_is_not_found(tmp_path: Path) -> None:
    gateway_app = app(tmp_path)
    for pin in ("accounts/fireworks/deployments/other", "accounts/fireworks/deployments/no"):
        response = await post(gateway_app, {"fireworks-deployment": pin})
        assert response.status_code == 404 and pin in response.json()["error"]["message"]
    assert gateway_app.workers.served.requests == []
