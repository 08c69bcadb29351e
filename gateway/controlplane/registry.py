"""The registry: accounts with their API keys, limits and budgets; deployments with their
replicas; routers over deployments; LoRA adapters.

This module holds the data model and the embedded YAML backend. A request's model id is
resolved here to its Targets (the deployment or router it names, then their fallbacks, in
order); which deployment of a router serves it is dataplane/targets.py's choice, and which
replica dataplane/replicas.py's.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from gateway.controlplane.budgets import Budget, named_once
from gateway.errors import GatewayError

PUBLIC_ACCOUNT = "fireworks"


def hash_key(api_key: str) -> str:
    return "sha256:" + hashlib.sha256(api_key.encode()).hexdigest()


class Record(BaseModel):
    # Finite floats only: NaN or Infinity in stored JSON would be refused by every reader.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def check_replica_url(url: str) -> str:
    """http(s)://host[:port][/path], with a port that exists, or dns+http(s)://name[:port]
    (every address of the name is a replica: dataplane/discovery.py). Checked when the
    registry is loaded or changed, not when a request is sent to it."""
    try:
        parts = urlsplit(url.removeprefix("dns+"))
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"not a usable replica URL: {url!r} ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"a replica URL is [dns+]http(s)://host[:port]: {url!r}")
    if port == 0 or parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError(f"a replica URL has no port 0, query, fragment or user: {url!r}")
    return url


class Replica(Record):
    url: str
    # The worker's KV-cache event endpoint ("tcp://host:port"; its replay endpoint is
    # port + 1), when it differs from the deployment's kv_events_port on the URL's host.
    kv_events: str | None = Field(default=None, pattern=r"^tcp://[^\s/]+:[0-9]{1,5}$")
    # Drained (admin API): no new request goes to it; its streams finish there, or move
    # to another replica if its worker stops first (docs/operations.md, "Draining").
    draining: bool = False

    @field_validator("url")
    @classmethod
    def _usable(cls, url: str) -> str:
        return check_replica_url(url)


class Limits(Record):
    """An account's rate limits; 0 means unlimited. Token limits count per minute (the
    per-minute reading of Fireworks' rate-limit headers)."""

    requests_per_minute: int = Field(default=0, ge=0)
    prompt_tokens_per_minute: int = Field(default=0, ge=0)
    generated_tokens_per_minute: int = Field(default=0, ge=0)
    concurrent_requests: int = Field(default=0, ge=0)

    def any(self) -> bool:
        return any((self.requests_per_minute, self.prompt_tokens_per_minute,
                    self.generated_tokens_per_minute, self.concurrent_requests))


# A target's name: `accounts/<a>/deployments/<d>` or `accounts/<a>/routers/<r>`.
TARGET_NAME = r"^accounts/[A-Za-z0-9][A-Za-z0-9._-]{0,62}/(deployments|routers)/[^/#\s]{1,128}$"
Fallbacks = list[Annotated[str, Field(pattern=TARGET_NAME)]]


class DeploymentSettings(Record):
    """Everything about a deployment but its name: the one schema, with its validation and
    defaults, for the registry file, the admin API (whose path names the deployment) and the
    CLI (whose unset options fall back to these defaults)."""

    model: str  # the model resource name, e.g. accounts/fireworks/models/smollm2-135m-instruct
    default: bool = False  # the target for requests that name only the model
    # What its workers do: generate text (vLLM's generate runner) or embed it (its pooling
    # runner, `--runner pooling`). Each endpoint serves deployments of its task only.
    task: Literal["generate", "embed"] = "generate"
    context_length: int | None = Field(default=None, gt=0)
    # Per-deployment defaults when the client sends no max_tokens.
    max_tokens_chat: int = Field(default=2048, ge=0)
    max_tokens_completion: int = Field(default=16, ge=0)
    # The sampling keys of the model's generation_config.json (temperature, top_p, top_k,
    # min_p, typical_p, repetition_penalty): defaults for what the client does not send.
    generation_config: dict[str, float] = Field(default_factory=dict)
    # The workers' vLLM --tool-call-parser; None: requests with tools get a 400.
    tool_parser: str | None = None
    # The workers' vLLM --reasoning-parser; None: requests that ask for reasoning get a 400.
    reasoning_parser: str | None = None
    # The workers run vLLM's priority scheduler (--scheduling-policy priority), so
    # service_tier "priority" is served first; elsewhere it is reported as ignored.
    priority_scheduling: bool = False
    # Load (requests running + waiting) at which a replica counts as saturated; while every
    # replica is, requests wait in the gateway's queue (dataplane/queue.py). None: the
    # gateway's queue_replica_load.
    queue_replica_load: int | None = Field(default=None, ge=0)
    # The port on which every worker of the deployment publishes its KV-cache events (the
    # launcher's --kv-events-port; replay on the next port): the gateway then routes on what
    # each pod really has cached (dataplane/kv_events.py). None: no events.
    kv_events_port: int | None = Field(default=None, ge=1, le=65534)
    replicas: list[Replica] = Field(default_factory=list)
    # "ready" serves; "disabled" answers 503 (kept, e.g. while its workers are replaced).
    state: Literal["ready", "disabled"] = "ready"
    # Targets (deployments or routers) that serve its requests, in order, when it sheds,
    # is disabled, has no replica in rotation or refuses a prompt as too long for its
    # context (dataplane/targets.py).
    fallbacks: Fallbacks = Field(default_factory=list, max_length=8)


class Deployment(DeploymentSettings):
    id: str
    account: str

    @cached_property  # read several times per request; a snapshot's deployment never changes
    def name(self) -> str:
        return f"accounts/{self.account}/deployments/{self.id}"


class Account(Record):
    id: str
    api_keys: list[str] = Field(default_factory=list)  # "sha256:<hex>"
    limits: Limits = Field(default_factory=Limits)
    # Token budgets over a UTC day or month (controlplane/budgets.py), names unique.
    budgets: list[Budget] = Field(default_factory=list, max_length=8)
    # In the gateway's queue: a higher priority goes first; within one priority, accounts
    # take turns in proportion to their weight.
    priority: int = 0
    weight: int = Field(default=1, ge=1, le=1000)
    # May ask for service_tier "priority" (ahead in the gateway's queue, and in the workers'
    # scheduler where they run one): an entitlement given here, never the client's to take;
    # without it the request is served at the standard tier, the tier reported as ignored.
    priority_tier: bool = False

    _budgets_named_once = field_validator("budgets")(named_once)


class Lora(Record):
    """A LoRA adapter, its own model `accounts/<account>/models/<id>`, served on a base
    deployment of the same account (dataplane/adapters.py loads it on its workers)."""

    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
    account: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
    deployment: str  # the base deployment's id
    source: str = Field(min_length=1)  # a path on the workers' model cache, or a HF id

    @property
    def model(self) -> str:
        return f"accounts/{self.account}/models/{self.id}"

    @property
    def worker_name(self) -> str:
        """The name the workers know it by (the gateway manages the adapters named so). The
        account and the id are joined by a character neither may hold, so that two accounts'
        adapters never share a name on a shared worker (`a` + `b.c` and `a.b` + `c` would)."""
        return f"{LORA_PREFIX}{self.account}:{self.id}"


LORA_PREFIX = "fwlora."


class RouterDeployment(Record):
    deployment: str = Field(pattern=r"^[^/#\s]{1,128}$")  # a deployment id of its account
    weight: int = Field(default=1, ge=1, le=1_000_000)  # for weighted-random


class RouterSettings(Record):
    """Everything about a router but its name (the admin API's path names it)."""

    model: str  # the model it serves, e.g. accounts/<a>/models/<m>
    deployments: list[RouterDeployment] = Field(min_length=1, max_length=64)
    # weighted-random: at random by weight; even-load: the deployment whose replicas carry
    # the least load (the workers' reported load, dataplane/load.py).
    strategy: Literal["weighted-random", "even-load"] = "weighted-random"
    default: bool = False  # the model's default target (before any default deployment)
    fallbacks: Fallbacks = Field(default_factory=list, max_length=8)


class Router(RouterSettings):
    """`accounts/<account>/routers/<id>`: one of its deployments serves each request."""

    id: str = Field(pattern=r"^[^/#\s]{1,128}$")
    account: str

    @cached_property
    def name(self) -> str:
        return f"accounts/{self.account}/routers/{self.id}"


Target = Deployment | Router


class RegistryData(Record):
    accounts: list[Account] = Field(default_factory=list)
    deployments: list[Deployment] = Field(default_factory=list)
    loras: list[Lora] = Field(default_factory=list)
    routers: list[Router] = Field(default_factory=list)


@dataclass(frozen=True)
class Route:
    """Where one request goes: the deployment (with a LoRA adapter on it, or none), and the
    model id to echo back."""

    deployment: Deployment
    requested_model: str
    lora: Lora | None = None
    priority_tier: bool = False  # the account may ask for the priority tier (Account)
    router: Router | None = None  # the router that chose the deployment, if any
    # The targets passed over before this one, as "<reason>:<target name>", comma-separated.
    fallback: str = ""

    @property
    def model(self) -> str:
        """The model served: the adapter's, or the deployment's."""
        return self.lora.model if self.lora is not None else self.deployment.model


@dataclass(frozen=True)
class Targets:
    """What a request's model id names: the target it goes to first, then that target's
    fallbacks the account can see, in order, each once (a fallback's own fallbacks are not
    followed: no chains, no loops). A LoRA adapter has none: only its base serves it."""

    requested_model: str
    order: tuple[Target, ...]
    lora: Lora | None = None
    priority_tier: bool = False

    @property
    def first(self) -> Target:
        return self.order[0]


class Registry:
    """Lookups over one snapshot of the registry data."""

    def __init__(self, data: RegistryData, *,
                 public_accounts: tuple[str, ...] = (PUBLIC_ACCOUNT,)) -> None:
        self.data = data
        self.public_accounts = public_accounts
        self._keys = {key: account for account in data.accounts for key in account.api_keys}
        self._named: dict[str, Target] = {d.name: d for d in data.deployments}
        self._named.update((r.name, r) for r in data.routers)
        # What was found for recent keys and models (this snapshot never changes; a change
        # makes a new Registry): a request skips the hashing and the search.
        self._known_keys: dict[str, Account] = {}
        self._routes: dict[tuple[str, str, str | None], Targets] = {}

    @classmethod
    def from_yaml(cls, path: Path, keys_path: Path | None = None) -> Registry:
        return cls(load_yaml(path, keys_path))

    def authenticate(self, api_key: str | None) -> Account:
        if not api_key:
            raise GatewayError(401, "Missing API key: send 'Authorization: Bearer <key>'")
        account = self._known_keys.get(api_key)
        if account is not None:
            return account
        # A lookup by the key's SHA-256: what its timing could reveal is about the hash,
        # which does not help to find a key.
        account = self._keys.get(hash_key(api_key))
        if account is None:
            raise GatewayError(401, "Invalid API key")  # (never kept: bounded by real keys)
        _keep(self._known_keys, api_key, account)
        return account

    def visible(self, account: Account, owner: str) -> bool:
        return owner == account.id or owner in self.public_accounts

    def visible_deployments(self, account: Account) -> list[Deployment]:
        return [d for d in self.data.deployments if self.visible(account, d.account)]

    def visible_routers(self, account: Account) -> list[Router]:
        return [r for r in self.data.routers if self.visible(account, r.account)]

    def visible_loras(self, account: Account) -> list[Lora]:
        return [lora for lora in self.data.loras if self.visible(account, lora.account)]

    def base_of(self, lora: Lora) -> Deployment | None:
        return next((d for d in self.data.deployments
                     if d.account == lora.account and d.id == lora.deployment), None)

    def deployments_of(self, router: Router) -> list[tuple[Deployment, int]]:
        """The router's deployments that exist, with their weights."""
        out = []
        for member in router.deployments:
            found = self._named.get(f"accounts/{router.account}/deployments/"
                                    f"{member.deployment}")
            if isinstance(found, Deployment):
                out.append((found, member.weight))
        return out

    def account(self, account_id: str) -> Account | None:
        return next((a for a in self.data.accounts if a.id == account_id), None)

    def resolve(self, model_ref: str, account: Account, pin: str | None = None) -> Targets:
        """Resolve `accounts/<a>/models/<m>`, `accounts/<a>/deployments/<d>`,
        `accounts/<a>/routers/<r>` and `<model>#<deployment>`; `pin` (the
        `fireworks-deployment` header) names the deployment as `#` does, and must agree with
        the model. Anything the account may not use is reported exactly like something that
        does not exist."""
        key = (model_ref, account.id, pin)
        targets = self._routes.get(key)
        if targets is None:
            targets = self._resolve(model_ref, account, pin)
            _keep(self._routes, key, targets)  # only what resolved: bounded by the registry
        return targets

    def _resolve(self, model_ref: str, account: Account, pin: str | None) -> Targets:
        base, _, pinned = model_ref.partition("#")
        base = self._expand(base)
        visible = self.visible_deployments(account)
        asked = model_ref if pin is None else f"{model_ref} (fireworks-deployment: {pin})"
        not_found = GatewayError(404, f"Model not found, inaccessible, and/or not deployed: "
                                      f"{asked}", param="model")
        if pin is not None:
            pin = self._expand(pin, kind="deployments")
            if pinned and self._expand(pinned, kind="deployments") != pin:
                raise not_found  # two pins that disagree
            if "/deployments/" in base:  # the body names a deployment: the same one
                if base != pin:
                    raise not_found
                pin = None
            pinned = pin or pinned
        # A LoRA model is served by its base deployment (which the pin, if any, must name).
        lora = next((x for x in self.visible_loras(account) if x.model == base), None)
        if pinned:
            pinned = self._expand(pinned, kind="deployments")
        router = next((r for r in self.visible_routers(account) if r.name == base), None)
        match: list[Target]
        if lora is not None:
            deployment = self.base_of(lora)
            match = [deployment] if deployment is not None and (
                not pinned or deployment.name == pinned) else []
        elif router is not None:  # pinned: one of the router's deployments
            match = [d for d, _ in self.deployments_of(router) if d.name == pinned] \
                if pinned else [router]
        elif pinned:
            match = [d for d in visible if d.name == pinned and d.model == base]
        elif "/deployments/" in base:
            match = [d for d in visible if d.name == base]
        else:
            serving: list[Target] = [d for d in visible if d.model == base]
            defaults: list[Target] = [r for r in self.visible_routers(account)
                                      if r.default and r.model == base]
            match = defaults or [d for d in serving if d.default] or serving[:1]
        if not match:
            raise not_found
        order: list[Target] = [match[0]]
        if lora is None:
            for name in match[0].fallbacks:
                found = self._named.get(name)
                if found is not None and self.visible(account, found.account) \
                        and found not in order:
                    order.append(found)
        return Targets(requested_model=model_ref, order=tuple(order), lora=lora,
                       priority_tier=account.priority_tier)

    @staticmethod
    def _expand(ref: str, kind: str = "models") -> str:
        """Short forms: `fireworks/<id>` and a bare `<id>` mean `accounts/fireworks/<kind>/<id>`."""
        if ref.startswith("accounts/"):
            return ref
        if ref.startswith("fireworks/"):
            ref = ref.removeprefix("fireworks/")
        return f"accounts/{PUBLIC_ACCOUNT}/{kind}/{ref}" if "/" not in ref else ref


KEPT = 4096  # lookups kept per snapshot; past that the memo starts again


def _keep(memo: dict[Any, Any], key: Any, value: Any) -> None:
    if len(memo) >= KEPT:
        memo.clear()
    memo[key] = value


def load_yaml(path: Path, keys_path: Path | None = None) -> RegistryData:
    """The YAML registry, with the keys of an optional separate file (`{account: [hash]}`,
    e.g. a mounted Kubernetes Secret) merged into its accounts."""
    data = RegistryData.model_validate(yaml.safe_load(path.read_text()) or {})
    if keys_path is not None:
        keys: dict[str, list[str]] = yaml.safe_load(keys_path.read_text()) or {}
        accounts = {account.id: account for account in data.accounts}
        for account_id, hashes in keys.items():
            account = accounts.setdefault(account_id, Account(id=account_id))
            account.api_keys = [*account.api_keys, *hashes]
        data.accounts = list(accounts.values())
    return data
