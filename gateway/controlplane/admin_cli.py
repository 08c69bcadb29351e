"""`fireworks-gateway admin ...`: the admin API from the command line, and `usage`.

The admin commands talk HTTP to any gateway replica (`--url`, GATEWAY_ADMIN_URL) with the
admin key (`--admin-key`, GATEWAY_ADMIN_KEY); `usage` reads the usage stream in Redis.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import orjson
import typer

from gateway.controlplane.registry import DeploymentSettings

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Manage deployments, replicas, API keys and limits through the admin API.")
deployments = typer.Typer(no_args_is_help=True, help="Deployments of an account.")
replicas = typer.Typer(no_args_is_help=True, help="The vLLM replicas of a deployment.")
keys = typer.Typer(no_args_is_help=True, help="API keys of an account.")
loras = typer.Typer(no_args_is_help=True,
                    help="LoRA adapters of an account, served on its base deployments.")
app.add_typer(deployments, name="deployments")
app.add_typer(loras, name="loras")
app.add_typer(replicas, name="replicas")
app.add_typer(keys, name="keys")
routers = typer.Typer(no_args_is_help=True,
                      help="Routers of an account: one of its deployments serves each request.")
budgets = typer.Typer(no_args_is_help=True,
                      help="Token budgets of an account over a UTC day or month.")
app.add_typer(routers, name="routers")
app.add_typer(budgets, name="budgets")

URL = typer.Option("http://127.0.0.1:8000", envvar="GATEWAY_ADMIN_URL",
                   help="a gateway's base URL")
KEY = typer.Option(..., envvar="GATEWAY_ADMIN_KEY", help="the admin key")


def call(method: str, url: str, admin_key: str, path: str, body: Any = None,
         params: dict[str, str] | None = None) -> Any:
    response = httpx.request(method, url.rstrip("/") + "/admin/v1" + path, json=body,
                             params=params, timeout=30,
                             headers={"Authorization": f"Bearer {admin_key}"})
    if response.status_code >= 400:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text
        typer.echo(f"error {response.status_code}: {message}", err=True)
        raise typer.Exit(1)
    result = response.json()
    typer.echo(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
    return result


@app.command("accounts")
def list_accounts(url: str = URL, admin_key: str = KEY) -> None:
    """List accounts with their limits."""
    call("GET", url, admin_key, "/accounts")


@deployments.command("list")
def list_deployments(account: str, url: str = URL, admin_key: str = KEY) -> None:
    call("GET", url, admin_key, f"/accounts/{account}/deployments")


FALLBACK = ("a target for when this one sheds, is disabled, has no replica or refuses a "
            "prompt as too long: accounts/<a>/deployments/<d> or accounts/<a>/routers/<r>; "
            "repeat, in order")


def _default(field: str) -> str:
    return f"default {DeploymentSettings.model_fields[field].default}"


def _given(fields: dict[str, Any]) -> dict[str, Any]:
    """Only the options that were given: the rest take the defaults of the one deployment
    schema (registry.DeploymentSettings), applied by the gateway."""
    return {k: v for k, v in fields.items() if v is not None}


@deployments.command("put")
def put_deployment(
    account: str, deployment: str,
    model: str = typer.Option(..., help="e.g. accounts/<account>/models/<name>"),
    replica: list[str] = typer.Option([], help="a worker URL; repeat for several"),
    default: bool = typer.Option(False, help="the model's default deployment"),
    context_length: int | None = typer.Option(None),
    max_tokens_chat: int | None = typer.Option(None, help=_default("max_tokens_chat")),
    max_tokens_completion: int | None = typer.Option(
        None, help=_default("max_tokens_completion")),
    tool_parser: str | None = typer.Option(None, help="the workers' --tool-call-parser"),
    reasoning_parser: str | None = typer.Option(None, help="the workers' --reasoning-parser"),
    priority_scheduling: bool = typer.Option(
        False, help="the workers run --scheduling-policy priority"),
    fallback: list[str] = typer.Option([], help=FALLBACK),
    url: str = URL, admin_key: str = KEY,
) -> None:
    """Create a deployment, or replace it."""
    call("PUT", url, admin_key, f"/accounts/{account}/deployments/{deployment}", _given({
        "model": model, "replicas": [{"url": u} for u in replica], "default": default,
        "context_length": context_length, "max_tokens_chat": max_tokens_chat,
        "max_tokens_completion": max_tokens_completion, "tool_parser": tool_parser,
        "reasoning_parser": reasoning_parser, "priority_scheduling": priority_scheduling,
        "fallbacks": fallback}))


@deployments.command("update")
def update_deployment(
    account: str, deployment: str,
    default: bool | None = typer.Option(None, "--default/--no-default"),
    state: str | None = typer.Option(None, help="ready or disabled"),
    context_length: int | None = typer.Option(None),
    max_tokens_chat: int | None = typer.Option(None),
    max_tokens_completion: int | None = typer.Option(None),
    tool_parser: str | None = typer.Option(None),
    reasoning_parser: str | None = typer.Option(None),
    priority_scheduling: bool | None = typer.Option(
        None, "--priority-scheduling/--no-priority-scheduling"),
    fallback: list[str] | None = typer.Option(None, help=FALLBACK + " (replaces them)"),
    url: str = URL, admin_key: str = KEY,
) -> None:
    """Change some fields of a deployment."""
    call("PATCH", url, admin_key, f"/accounts/{account}/deployments/{deployment}", _given({
        "default": default, "state": state, "context_length": context_length,
        "max_tokens_chat": max_tokens_chat, "max_tokens_completion": max_tokens_completion,
        "tool_parser": tool_parser, "reasoning_parser": reasoning_parser,
        "priority_scheduling": priority_scheduling, "fallbacks": fallback}))


@loras.command("list")
def list_loras(account: str, url: str = URL, admin_key: str = KEY) -> None:
    """The account's adapters, and which replicas hold them."""
    call("GET", url, admin_key, f"/accounts/{account}/loras")


@loras.command("put")
def put_lora(
    account: str, lora: str,
    deployment: str = typer.Option(..., help="the base deployment (same account)"),
    source: str = typer.Option(..., help="adapter path on the workers, or a Hugging Face id"),
    url: str = URL, admin_key: str = KEY,
) -> None:
    """Serve an adapter as accounts/<account>/models/<lora> on its base deployment."""
    call("PUT", url, admin_key, f"/accounts/{account}/loras/{lora}",
         {"deployment": deployment, "source": source})


@loras.command("delete")
def delete_lora(account: str, lora: str, url: str = URL, admin_key: str = KEY) -> None:
    call("DELETE", url, admin_key, f"/accounts/{account}/loras/{lora}")


@deployments.command("delete")
def delete_deployment(account: str, deployment: str, url: str = URL,
                      admin_key: str = KEY) -> None:
    call("DELETE", url, admin_key, f"/accounts/{account}/deployments/{deployment}")


@replicas.command("add")
def add_replica(account: str, deployment: str, replica_url: str, url: str = URL,
                admin_key: str = KEY,
                kv_events: str | None = typer.Option(
                    None, help="its KV-cache event endpoint, tcp://host:port")) -> None:
    body = {"url": replica_url} | ({"kv_events": kv_events} if kv_events else {})
    call("POST", url, admin_key, f"/accounts/{account}/deployments/{deployment}/replicas",
         body)


@replicas.command("remove")
def remove_replica(account: str, deployment: str, replica_url: str, url: str = URL,
                   admin_key: str = KEY) -> None:
    call("DELETE", url, admin_key, f"/accounts/{account}/deployments/{deployment}/replicas",
         params={"url": replica_url})


@keys.command("create")
def create_key(account: str, url: str = URL, admin_key: str = KEY) -> None:
    """Make a key; it is shown once (the registry keeps its hash, the key id)."""
    call("POST", url, admin_key, f"/accounts/{account}/api-keys")


@keys.command("list")
def list_keys(account: str, url: str = URL, admin_key: str = KEY) -> None:
    call("GET", url, admin_key, f"/accounts/{account}/api-keys")


@keys.command("delete")
def delete_key(account: str, key_id: str, url: str = URL, admin_key: str = KEY) -> None:
    call("DELETE", url, admin_key, f"/accounts/{account}/api-keys/{key_id}")


@app.command("limits")
def set_limits(
    account: str,
    requests_per_minute: int = typer.Option(0, "--rpm", help="0: unlimited"),
    prompt_tokens_per_minute: int = typer.Option(0, "--prompt-tpm"),
    generated_tokens_per_minute: int = typer.Option(0, "--generated-tpm"),
    concurrent_requests: int = typer.Option(0, "--concurrent"),
    url: str = URL, admin_key: str = KEY,
) -> None:
    """Set an account's rate limits (all of them; omitted ones become unlimited)."""
    call("PUT", url, admin_key, f"/accounts/{account}/limits", {
        "requests_per_minute": requests_per_minute,
        "prompt_tokens_per_minute": prompt_tokens_per_minute,
        "generated_tokens_per_minute": generated_tokens_per_minute,
        "concurrent_requests": concurrent_requests})


@routers.command("list")
def list_routers(account: str, url: str = URL, admin_key: str = KEY) -> None:
    call("GET", url, admin_key, f"/accounts/{account}/routers")


@routers.command("put")
def put_router(
    account: str, router: str,
    model: str = typer.Option(..., help="the model it serves"),
    deployment: list[str] = typer.Option(
        ..., help="a deployment id of the account, optionally =weight (d1=3); repeat"),
    strategy: str = typer.Option("weighted-random", help="weighted-random or even-load"),
    default: bool = typer.Option(False, help="the model's default target"),
    fallback: list[str] = typer.Option([], help=FALLBACK),
    url: str = URL, admin_key: str = KEY,
) -> None:
    """Create a router accounts/<account>/routers/<router>, or replace it."""
    members = []
    for given in deployment:
        name, _, weight = given.partition("=")
        members.append({"deployment": name, "weight": int(weight or 1)})
    call("PUT", url, admin_key, f"/accounts/{account}/routers/{router}", {
        "model": model, "deployments": members, "strategy": strategy, "default": default,
        "fallbacks": fallback})


@routers.command("delete")
def delete_router(account: str, router: str, url: str = URL, admin_key: str = KEY) -> None:
    call("DELETE", url, admin_key, f"/accounts/{account}/routers/{router}")


@budgets.command("get")
def get_budgets(account: str, url: str = URL, admin_key: str = KEY) -> None:
    """The account's budgets and what each spent in its current window."""
    call("GET", url, admin_key, f"/accounts/{account}/budgets")


@budgets.command("put")
def put_budget(
    account: str, name: str,
    window: str = typer.Option(..., help="day or month (UTC)"),
    tokens: int = typer.Option(..., help="what the window may spend, weighted"),
    input_weight: float = typer.Option(1.0, help="per prompt token not cached"),
    cached_weight: float = typer.Option(1.0, help="per cached prompt token"),
    output_weight: float = typer.Option(1.0, help="per generated token"),
    shadow: bool = typer.Option(False, help="only count what it would refuse"),
    url: str = URL, admin_key: str = KEY,
) -> None:
    """Add the budget, or replace the one of that name (its window's spend is kept)."""
    current = _budgets(url, admin_key, account)
    made = {"name": name, "window": window, "tokens": tokens, "input_weight": input_weight,
            "cached_weight": cached_weight, "output_weight": output_weight, "shadow": shadow}
    kept = [b for b in current if b["name"] != name]
    call("PUT", url, admin_key, f"/accounts/{account}/budgets", {"budgets": [*kept, made]})


@budgets.command("delete")
def delete_budget(account: str, name: str, url: str = URL, admin_key: str = KEY) -> None:
    kept = [b for b in _budgets(url, admin_key, account) if b["name"] != name]
    call("PUT", url, admin_key, f"/accounts/{account}/budgets", {"budgets": kept})


BUDGET_FIELDS = ("name", "window", "tokens", "input_weight", "cached_weight", "output_weight",
                 "shadow")


def _budgets(url: str, admin_key: str, account: str) -> list[dict[str, Any]]:
    response = httpx.get(url.rstrip("/") + f"/admin/v1/accounts/{account}/budgets",
                         headers={"Authorization": f"Bearer {admin_key}"}, timeout=30)
    response.raise_for_status()
    return [{k: b[k] for k in BUDGET_FIELDS} for b in response.json()["budgets"]]


def usage_table(redis_url: str, prefix: str, password: str | None = None) -> str:
    """Usage per account from the totals in Redis (the bulk instance), as a table."""
    import redis.asyncio as aioredis

    from gateway.controlplane.redis_ledger import read_totals
    from gateway.controlplane.usage import UsageTotals

    async def read() -> dict[str, UsageTotals]:
        client = aioredis.from_url(redis_url, password=password)
        try:
            return await read_totals(client, prefix)
        finally:
            await client.aclose()

    totals = asyncio.run(read())
    lines = [f"{'account':<24}{'requests':>10}{'prompt':>12}{'cached':>10}{'completion':>12}"
             "  statuses"]
    for account, total in sorted(totals.items()):
        statuses = ", ".join(f"{k} {v}" for k, v in sorted(total.by_status.items()))
        lines.append(f"{account:<24}{total.requests:>10}{total.prompt_tokens:>12}"
                     f"{total.cached_tokens:>10}{total.completion_tokens:>12}  {statuses}")
    return "\n".join(lines)
