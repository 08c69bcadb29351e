"""Where the registry lives: the embedded YAML file, or Redis shared by gateway replicas.

Both backends hold the current snapshot as an immutable `Registry` (`store.current`), so a
request sees one consistent registry from start to end, and both apply admin changes as a
function from the old data to the new (`store.change(fn)`).

Redis layout (prefix `fwgw:` by default): `<prefix>registry` holds the RegistryData as JSON
and `<prefix>registry:version` a counter bumped by every change. Each gateway polls the
version (one GET) every `registry_poll_interval` seconds and reloads when it moved, so a
change made through any gateway reaches all of them within a second without pub/sub (whose
messages are lost while a subscriber reconnects). When Redis is unreachable the gateway
keeps serving its last good copy; when Redis comes back empty (restarted without its data)
the gateway writes that copy back. A stored registry that does not validate (written by an
older or newer gateway, or by hand) is not loaded: the gateway keeps its last good copy (the
seed file at start-up), reports the problem (`store.problem`, the admin API's
`GET /admin/v1/registry`, the `fwgw_registry_invalid` gauge), and the next admin change
starts from that copy, which repairs Redis.

The YAML file is the declared part of the registry (the Helm chart renders it from values):
when it changes, the next gateway to start merges it into Redis (its deployments replace
those with the same id, its keys are added); what the admin API added stays.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import orjson
import redis.asyncio as aioredis
import yaml
from pydantic import ValidationError
from redis.exceptions import RedisError, WatchError

from gateway.background import cancel
from gateway.controlplane.registry import Registry, RegistryData, load_yaml

logger = logging.getLogger("gateway.store")

Change = Callable[[RegistryData], RegistryData]


class RegistryStore(Protocol):
    @property
    def current(self) -> Registry: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def change(self, fn: Change) -> Registry: ...

    @property
    def problem(self) -> str | None:
        """Why the stored registry is not the one being served; None when it is."""


def _copy(data: RegistryData) -> RegistryData:
    return data.model_copy(deep=True)


class YamlStore:
    """The embedded backend: one file, one process. Admin changes are written back to the
    file when it is writable (else they live until the process ends)."""

    def __init__(self, path: Path, keys_path: Path | None = None,
                 public_accounts: tuple[str, ...] = ("fireworks",)) -> None:
        self.path = path
        self.public_accounts = public_accounts
        self._registry = Registry(load_yaml(path, keys_path), public_accounts=public_accounts)
        self._lock = asyncio.Lock()

    @property
    def current(self) -> Registry:
        return self._registry

    @property
    def problem(self) -> str | None:
        return None

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def change(self, fn: Change) -> Registry:
        async with self._lock:
            data = RegistryData.model_validate(fn(_copy(self._registry.data)).model_dump())
            self._registry = Registry(data, public_accounts=self.public_accounts)
            try:
                _write_atomically(self.path, yaml_of(data))
            except OSError as exc:
                logger.warning("registry change kept in memory only: %s", exc)
            return self._registry


def _write_atomically(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


class RedisStore:
    """The shared backend. `seed` (the YAML file) fills an empty Redis and is the starting
    copy while Redis cannot be reached."""

    def __init__(self, client: aioredis.Redis, seed: RegistryData, *, prefix: str = "fwgw:",
                 poll_interval: float = 0.25,
                 public_accounts: tuple[str, ...] = ("fireworks",)) -> None:
        self.redis = client
        self.key = f"{prefix}registry"
        self.version_key = f"{prefix}registry:version"
        self.seed_key = f"{prefix}registry:seed"  # digest of the last merged YAML file
        # Each account's API keys as the last merged file declared them: a key the next
        # file no longer declares is revoked (the admin API's own keys are not the file's).
        self.seed_keys_key = f"{prefix}registry:seed-keys"
        self.poll_interval = poll_interval
        self.public_accounts = public_accounts
        self._seed = seed
        self._seed_digest = hashlib.sha256(seed.model_dump_json().encode()).hexdigest()
        self._registry = Registry(_copy(seed), public_accounts=public_accounts)
        self._version: int | None = None  # None: never loaded from Redis
        self._task: asyncio.Task[None] | None = None
        self._problem: str | None = None
        self._bad_version: int | None = None
        self.on_problem: Callable[[str | None], None] = lambda problem: None

    @property
    def current(self) -> Registry:
        return self._registry

    @property
    def problem(self) -> str | None:
        return self._problem

    def _set_problem(self, problem: str | None) -> None:
        if problem != self._problem:
            if problem is None:
                logger.info("the stored registry is valid again")
            else:
                logger.error("the stored registry does not validate, serving the last good "
                             "copy: %s", problem)
        self._problem = problem
        self.on_problem(problem)

    def _parse(self, raw: bytes | str) -> RegistryData | None:
        try:
            return RegistryData.model_validate_json(raw)
        except ValidationError as exc:
            self._set_problem(_first_error(exc))
            return None

    async def start(self) -> None:
        try:
            await self.refresh()
            await self.apply_seed()
        except (RedisError, OSError):
            pass  # the poll loop goes on trying; the seed is served meanwhile
        except Exception:  # nothing in Redis may stop a gateway from starting
            logger.exception("registry start-up against Redis failed; serving the seed file")
        self._task = asyncio.create_task(self._poll(), name="registry-poll")

    async def apply_seed(self) -> None:
        """Merge the declared registry into Redis once per version of the file."""
        applied = await self.redis.get(self.seed_key)
        if applied in (self._seed_digest, self._seed_digest.encode()):
            return
        raw = await self.redis.get(self.seed_keys_key)
        previous = orjson.loads(raw) if raw else None
        await self.change(lambda data: merge_seed(data, self._seed, previous))
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(self.seed_keys_key, seed_keys(self._seed))
            pipe.set(self.seed_key, self._seed_digest)
            await pipe.execute()

    async def stop(self) -> None:
        await cancel(self._task)

    async def refresh(self) -> None:
        """Reload when the version moved; write our copy back when Redis has none."""
        version = await self.redis.get(self.version_key)
        if version is None:
            await self._publish_if_absent()
            version = await self.redis.get(self.version_key)
        if version is not None and int(version) not in (self._version, self._bad_version):
            raw_version, raw = await self.redis.mget(self.version_key, self.key)
            if raw is not None and raw_version is not None:
                data = self._parse(raw)
                if data is None:
                    self._bad_version = int(raw_version)
                    return
                self._registry = Registry(data, public_accounts=self.public_accounts)
                self._version = int(raw_version)
                self._set_problem(None)

    async def _publish_if_absent(self) -> None:
        copy = self._registry.data if self._version is not None else self._seed
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(self.key, copy.model_dump_json(), nx=True)
            pipe.setnx(self.version_key, 1)
            if self._version is None:
                pipe.setnx(self.seed_key, self._seed_digest)
                pipe.setnx(self.seed_keys_key, seed_keys(self._seed))
            written, *_ = await pipe.execute()
        if written:
            logger.info("registry written to Redis from the %s",
                        "last good copy" if self._version is not None else "seed file")

    async def _poll(self) -> None:
        failing = False
        while True:
            try:
                await self.refresh()
                if failing:
                    logger.info("Redis reachable again; registry version %s", self._version)
                failing = False
            except Exception as exc:  # the loop must outlive anything one refresh meets
                if not failing:
                    logger.warning("registry refresh failed, serving the last good copy: %r",
                                   exc)
                failing = True
            await asyncio.sleep(self.poll_interval)

    async def change(self, fn: Change) -> Registry:
        """Optimistic transaction: read, apply, write if nobody wrote in between."""
        while True:
            async with self.redis.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(self.key, self.version_key)
                    raw = await pipe.get(self.key)
                    stored = self._parse(raw) if raw is not None else None
                    current = stored if stored is not None else _copy(self._registry.data)
                    data = RegistryData.model_validate(fn(current).model_dump())
                    pipe.multi()  # type: ignore[no-untyped-call]
                    pipe.set(self.key, data.model_dump_json())
                    pipe.incr(self.version_key)
                    _, version = await pipe.execute()
                except WatchError:
                    continue
            self._registry = Registry(data, public_accounts=self.public_accounts)
            self._version = int(version)
            self._set_problem(None)
            return self._registry


def _first_error(exc: ValidationError) -> str:
    first = exc.errors(include_url=False)[0]
    where = ".".join(str(p) for p in first["loc"])
    return f"{where}: {first['msg']}"


def seed_keys(seed: RegistryData) -> bytes:
    """Each account's API keys as the seed declares them (JSON)."""
    return orjson.dumps({a.id: sorted(a.api_keys) for a in seed.accounts})


def merge_seed(data: RegistryData, seed: RegistryData,
               previous: dict[str, list[str]] | None = None) -> RegistryData:
    """The seed's accounts, keys, deployments and routers merged into the registry: what the
    seed declares wins (limits and budgets where it declares any); keys the previous seed
    declared and this one does not are revoked (keys added through the admin API stay until
    deleted there)."""
    declared_keys = {a.id: set(a.api_keys) for a in seed.accounts}
    for account in data.accounts:
        dropped = set((previous or {}).get(account.id, ())) \
            - declared_keys.get(account.id, set())
        account.api_keys = [k for k in account.api_keys if k not in dropped]
    declared = {(d.account, d.id) for d in seed.deployments}
    data.deployments = [d for d in data.deployments if (d.account, d.id) not in declared]
    data.deployments += [d.model_copy(deep=True) for d in seed.deployments]
    routers = {(r.account, r.id) for r in seed.routers}
    data.routers = [r for r in data.routers if (r.account, r.id) not in routers]
    data.routers += [r.model_copy(deep=True) for r in seed.routers]
    accounts = {a.id: a for a in data.accounts}
    for account in seed.accounts:
        if account.id not in accounts:
            data.accounts.append(account.model_copy(deep=True))
            continue
        known = accounts[account.id]
        known.api_keys += [k for k in account.api_keys if k not in known.api_keys]
        if account.limits.any():
            known.limits = account.limits
        if account.budgets:
            known.budgets = [b.model_copy() for b in account.budgets]
    return data


def yaml_of(data: RegistryData) -> str:
    return yaml.safe_dump(data.model_dump(mode="json"), sort_keys=False)
