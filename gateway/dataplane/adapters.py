"""LoRA adapters on workers: every replica of a base deployment holds the adapters the
registry puts on it, and nothing else of the gateway's.

The workers run vLLM with `--enable-lora` and runtime updates on
(`VLLM_ALLOW_RUNTIME_LORA_UPDATING`); the gateway loads an adapter with
`/v1/load_lora_adapter` and unloads it with `/v1/unload_lora_adapter`, under the name
`Lora.worker_name` (the gateway touches only adapters named so). Every `interval` seconds,
and whenever asked, each replica's `/v1/models` says what it holds; what is missing is
loaded (a replica that restarted, or was just discovered, gets its adapters back), what the
registry no longer has is unloaded. A request for an adapter goes to a replica that holds it
when one does; else it waits, on the replica chosen, for the adapter to load there.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import orjson

from gateway.background import cancel, every
from gateway.controlplane.registry import LORA_PREFIX, Lora, RegistryData
from gateway.dataplane.replicas import ReplicaSet
from gateway.dataplane.workers import WorkerClient
from gateway.errors import GatewayError, WorkerFault

logger = logging.getLogger("gateway.adapters")


class Adapters:
    def __init__(self, client: WorkerClient, registry: Callable[[], RegistryData],
                 replicas: ReplicaSet, interval: float = 2.0, timeout: float = 120.0) -> None:
        self.client = client
        self.registry = registry
        self.replicas = replicas
        self.interval = interval
        self.timeout = timeout  # an adapter load reads its weights: allow for it
        self.held: dict[str, set[str]] = {}  # replica URL -> adapters it holds (worker names)
        self._loading: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._task: asyncio.Task[None] | None = None

    def holds(self, url: str, lora: Lora) -> bool:
        return lora.worker_name in self.held.get(url, set())

    def forget(self, url: str, lora: Lora) -> None:
        """The replica turned out not to hold it (it restarted since the last look)."""
        self.held.get(url, set()).discard(lora.worker_name)

    def start(self) -> None:
        self._task = every(self.interval, self.sync_all, "adapter sync", logger)

    async def stop(self) -> None:
        await cancel(self._task)

    def wanted(self) -> dict[str, dict[str, Lora]]:
        """Replica URL -> the adapters it should hold, by worker name: the replicas of base
        deployments, and those still holding an adapter that is gone (to unload it)."""
        data = self.registry()
        out: dict[str, dict[str, Lora]] = {url: {} for url, held in self.held.items() if held}
        for deployment in data.deployments:
            loras = {lora.worker_name: lora for lora in data.loras
                     if lora.account == deployment.account and lora.deployment == deployment.id}
            if not loras:
                continue
            for replica in self.replicas.replicas(deployment):
                out.setdefault(replica.url, {}).update(loras)
        return out

    async def sync_all(self) -> None:
        wanted = self.wanted()
        for gone in set(self.held) - set(wanted):
            del self.held[gone]
        await asyncio.gather(*(self.sync(url, loras) for url, loras in wanted.items()),
                             return_exceptions=True)

    async def sync(self, url: str, wanted: dict[str, Lora]) -> None:
        answer = await self.client.get(url.rstrip("/") + "/v1/models", 10.0)
        if answer is None or answer[0] != 200:
            return  # unreachable or not up: its health check deals with that
        try:
            listed = {m.get("id") for m in orjson.loads(answer[1]).get("data", [])}
        except (orjson.JSONDecodeError, AttributeError, TypeError):
            return
        held = {name for name in listed if isinstance(name, str) and name.startswith(LORA_PREFIX)}
        self.held[url] = held
        for name, lora in wanted.items():
            if name not in held:
                try:
                    await self.ensure(url, lora)
                except GatewayError as exc:
                    logger.warning("adapter %s on %s: %s", lora.model, url, exc.message)
        for name in held - set(wanted):
            await self._unload(url, name)

    async def ensure(self, url: str, lora: Lora) -> None:
        """Until the replica holds the adapter (one load at a time per replica and adapter,
        however many requests wait for it)."""
        if self.holds(url, lora):
            return
        key = (url, lora.worker_name)
        task = self._loading.get(key)
        if task is None:
            task = self._loading[key] = asyncio.create_task(self._load(url, lora))
            task.add_done_callback(lambda _: self._loading.pop(key, None))
        await asyncio.shield(task)

    async def _load(self, url: str, lora: Lora) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                await self._post(url, "/v1/load_lora_adapter",
                                 {"lora_name": lora.worker_name, "lora_path": lora.source})
        except GatewayError as exc:
            if "already been loaded" not in exc.message:
                raise WorkerFault(f"loading adapter {lora.model} failed: {exc.message}",
                                  message=f"The adapter {lora.model} could not be loaded "
                                          "on its deployment") from exc
        except TimeoutError as exc:
            raise WorkerFault(f"loading adapter {lora.model} timed out", status=504,
                              message=f"The adapter {lora.model} did not load in time") from exc
        self.held.setdefault(url, set()).add(lora.worker_name)
        logger.info("adapter %s loaded on %s", lora.model, url)

    async def _post(self, url: str, path: str, body: dict[str, str]) -> None:
        """A 2xx, or the GatewayError of what the worker said (vLLM answers these in text)."""
        answer = await self.client.open(url.rstrip("/") + path, orjson.dumps(body), {})
        try:
            await answer.read()
        finally:
            answer.close()

    async def _unload(self, url: str, name: str) -> None:
        try:
            await self._post(url, "/v1/unload_lora_adapter", {"lora_name": name})
        except GatewayError as exc:
            logger.warning("unloading adapter %s from %s: %s", name, url, exc.message)
            return
        self.held.get(url, set()).discard(name)
        logger.info("adapter %s unloaded from %s", name, url)
