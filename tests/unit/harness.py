"""The one in-process harness: the gateway over scripted workers (fake_worker.py), built one
way for every test that needs it.

    h = build(tmp_path, handler, hosts=("w1", "w2"))      # workers, registry, app
    async with h.running() as client:                      # one lifespan, one client
        await client.post("/inference/v1/completions", headers=auth(), json=...)
    response = await h.once("POST", "/inference/v1/...", json=...)   # a lifespan per request

`build` writes the registry (`registry(...)`: accounts by key, deployments over the scripted
workers' URLs), creates the app with `create_app`, and keeps what a test looks at
(`h.gateway`, `h.workers`, `h.settings`). `shared_deployment` is the common scene of two
accounts on one deployment over two workers; `serving` puts an app behind a real uvicorn.
No test builds the gateway in process any other way.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvicorn
import yaml

from gateway.api import InferenceApi
from gateway.app import create_app, inference_apis
from gateway.config import Settings
from gateway.controlplane.registry import hash_key
from gateway.controlplane.responses import ResponseStore
from gateway.dataplane.parts import Gateway
from gateway.dataplane.replicas import AffinityOrLeastOutstanding
from tests.conftest import free_port
from tests.unit.fake_worker import KEY, MODEL, FakeWorkers, Handler

BASE_URL = "http://gw"
# urls of the scripted workers (by host) -> the registry's content
RegistryOf = Callable[[dict[str, str]], dict[str, Any]]


def auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def registry(replicas: Iterable[str], accounts: dict[str, str] | None = None,
             deployments: list[dict[str, Any]] | None = None,
             **deployment: Any) -> dict[str, Any]:
    """A registry's content: `accounts` (id -> API key; default `fireworks` with KEY) and
    `deployments`; by default one default deployment `d` of MODEL over `replicas`, with
    `deployment`'s fields."""
    accounts = {"fireworks": KEY} if accounts is None else accounts
    if deployments is None:
        deployments = [{"id": "d", "account": "fireworks", "model": MODEL, "default": True,
                        "replicas": [{"url": url} for url in replicas]} | deployment]
    return {"accounts": [{"id": account, "api_keys": [hash_key(key)]}
                         for account, key in accounts.items()],
            "deployments": deployments}


EMBEDDER = "accounts/fireworks/models/e"


def with_embedder(urls: dict[str, str], **account: Any) -> dict[str, Any]:
    """`registry(urls)` (its account with `account`'s fields) and an embedding deployment
    `e` of EMBEDDER on the same worker."""
    content = registry(urls.values())
    content["accounts"][0] |= account
    content["deployments"].append({"id": "e", "account": "fireworks", "model": EMBEDDER,
                                   "default": True, "task": "embed",
                                   "replicas": [{"url": urls["worker"]}]})
    return content


def write_registry(tmp_path: Path, content: dict[str, Any]) -> Path:
    path = tmp_path / "registry.yaml"
    path.write_text(yaml.safe_dump(content))
    return path


@dataclass
class Harness:
    app: Any  # server.asgi.GatewayApp
    workers: FakeWorkers | None
    registry_path: Path

    @property
    def gateway(self) -> Gateway:
        gateway: Gateway = self.app.state.gateway
        return gateway

    @property
    def settings(self) -> Settings:
        settings: Settings = self.app.settings
        return settings

    @property
    def urls(self) -> dict[str, str]:
        return {} if self.workers is None else self.workers.urls

    @asynccontextmanager
    async def running(self, **client: Any) -> AsyncIterator[httpx.AsyncClient]:
        """The app's lifespan, and a client that talks to it in process."""
        async with self.app.router.lifespan_context(self.app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=self.app), base_url=BASE_URL,
                **client) as http:
            yield http

    async def once(self, method: str, path: str, *, key: str | None = KEY,
                   headers: dict[str, str] | None = None, **request: Any) -> httpx.Response:
        """One request in a lifespan of its own (what it left behind is seen after)."""
        async with self.running() as http:
            return await http.request(method, path, headers=(auth(key) if key else {})
                                      | (headers or {}), **request)


def build(tmp_path: Path, handler: Handler | None = None, *,
          hosts: tuple[str, ...] = ("worker",),
          registry_of: RegistryOf | dict[str, Any] | None = None,
          apis: Callable[[ResponseStore], Iterable[InferenceApi[Any]]] = inference_apis,
          listed_order: bool = False, **settings: Any) -> Harness:
    """The gateway over scripted workers (one per host, answering through `handler`; none
    without a handler). The registry is `registry_of(urls)` (or that content), by default
    `registry(urls)`. Settings: no health checks (only the scripted requests), then
    `settings`. `listed_order`: see in_listed_order."""
    workers = FakeWorkers(handler, hosts) if handler is not None else None
    urls = {} if workers is None else workers.urls
    if registry_of is None:
        content = registry(urls.values())
    else:
        content = registry_of(urls) if callable(registry_of) else registry_of
    path = write_registry(tmp_path, content)
    app = create_app(Settings(registry_path=path, **({"health_check_interval": 0} | settings)),
                     apis)
    if listed_order:
        in_listed_order(app)
    return Harness(app, workers, path)


def in_listed_order(gateway_app: Any) -> None:
    """Idle replicas are tried in the registry's order (not at random, nor by a key derived
    from the prompt), so that a test can say which replica meets a request first."""
    gateway = gateway_app.state.gateway
    gateway.replicas.policy = AffinityOrLeastOutstanding(pick=lambda tied: tied[0])
    gateway.settings.prefix_affinity_bytes = 0


@asynccontextmanager
async def serving(gateway_app: Any, protocol: Any) -> AsyncIterator[tuple[str, int]]:
    """The app (or a Harness's) served by uvicorn on a free port with the given HTTP protocol
    (the gateway's server.protocol.EdgeProtocol, or uvicorn's own "httptools"): (host,
    port)."""
    if isinstance(gateway_app, Harness):
        gateway_app = gateway_app.app
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(gateway_app, host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="on",
                                           http=protocol))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield "127.0.0.1", port
    finally:
        server.should_exit = True
        await task


# A deployment two accounts share: `fireworks` (KEY) on deployment `d` over workers w1 and
# w2, `other` (OTHER_KEY) with a deployment of its own on w1; the admin API open with ADMIN.
OTHER_KEY, ADMIN = "k-other", "admin-secret"
USAGE = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
COMPLETION = {"id": "x", "object": "text_completion", "created": 1, "usage": USAGE,
              "choices": [{"index": 0, "text": "hi", "finish_reason": "stop"}]}


def shared(urls: dict[str, str]) -> dict[str, Any]:
    return registry((), accounts={"fireworks": KEY, "other": OTHER_KEY}, deployments=[
        {"id": "d", "account": "fireworks", "model": MODEL, "default": True,
         "replicas": [{"url": urls["w1"]}, {"url": urls["w2"]}]},
        {"id": "secret", "account": "other", "model": "accounts/other/models/s",
         "default": True, "replicas": [{"url": urls["w1"]}]}])


def shared_deployment(tmp_path: Path, handler: Handler, **settings: Any) -> Harness:
    """The gateway over w1 and w2 with the `shared` registry, replicas tried in listed
    order."""
    return build(tmp_path, handler, hosts=("w1", "w2"), registry_of=shared,
                 listed_order=True, **({"admin_key": ADMIN} | settings))
