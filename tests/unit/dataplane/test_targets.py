"""Routers and fallbacks: the strategies and the fallback decisions as tables, then the
request's life over scripted workers: a router's choice and its weights, even load, and a
fallback on each reason (shed, disabled, no replica, context length), none where the client
is at fault or after the first byte."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from gateway.controlplane.budgets import Budget
from gateway.controlplane.limits import BudgetSpent, RateLimited
from gateway.controlplane.registry import Deployment, Registry, RegistryData
from gateway.dataplane.replicas import ReplicaSet
from gateway.dataplane.targets import choose, passes_over, route_to
from gateway.dataplane.workers import check_status
from gateway.errors import GatewayError, TargetUnavailable, WorkerFault
from tests.unit.fake_worker import MODEL, RESET, Pause, Stream, chunk
from tests.unit.harness import ADMIN, COMPLETION, Harness, auth, build, registry

BLUE, GREEN = "accounts/acme/deployments/blue", "accounts/acme/deployments/green"
CANARY = "accounts/acme/routers/canary"
KEY, OTHER_KEY = "k-acme", "k-other"


def deployment(name: str, **fields: Any) -> Deployment:
    return Deployment(id=name, account="acme", model=MODEL, **fields)


def test_weighted_random_holds_its_weights() -> None:
    members = [(deployment("a"), 3), (deployment("b"), 1), (deployment("c"), 6)]
    rng = random.Random(1)
    picks = Counter(choose("weighted-random", members, lambda d: 0.0, rng).id
                    for _ in range(10_000))
    for name, share in (("a", 0.3), ("b", 0.1), ("c", 0.6)):
        assert abs(picks[name] / 10_000 - share) < 0.02, picks


@pytest.mark.parametrize(("loads", "chosen"), [
    ({"a": 5.0, "b": 1.0, "c": 3.0}, {"b"}),
    ({"a": 0.0, "b": 0.0, "c": 9.0}, {"a", "b"}),  # ties at random
    ({"a": 2.0, "b": float("inf"), "c": 2.5}, {"a"}),
])
def test_even_load_takes_the_least_loaded(loads: dict[str, float], chosen: set[str]) -> None:
    members = [(deployment(name), 1) for name in loads]
    picks = {choose("even-load", members, lambda d: loads[d.id]).id for _ in range(200)}
    assert picks == chosen


@pytest.mark.parametrize(("error", "reason"), [
    (TargetUnavailable(503, "full", "shed"), "shed"),
    (TargetUnavailable(503, "off", "disabled"), "disabled"),
    (TargetUnavailable(503, "none", "no_replica"), "no_replica"),
    (TargetUnavailable(400, "long", "context_length"), "context_length"),
    (GatewayError(400, "temperature must be at most 2"), None),  # the client's fault
    (GatewayError(503, "no replica freed up in 30 s"), None),  # waited in the queue
    (RateLimited("requests", 1, {}), None),
    (BudgetSpent(Budget(name="b", window="day", tokens=1), 1, 1, 60), None),
    (WorkerFault("reset"), None),  # retried on another replica instead
])
def test_which_failures_pass_to_the_next_target(error: GatewayError,
                                                reason: str | None) -> None:
    assert passes_over(error) == reason


@pytest.mark.parametrize(("message", "context"), [
    ("This model's maximum context length is 2048 tokens. However, your request has 3000 "
     "input tokens. Please reduce the length of the input messages.", True),
    ("The decoder prompt (length 3000) is longer than the maximum model length of 2048. "
     "Make sure that `max_model_len` is no smaller than the number of text tokens.", True),
    ("temperature must be non-negative, got -1.", False),
])
def test_the_workers_context_refusal_is_told_apart(message: str, context: bool) -> None:
    body = orjson.dumps({"error": {"message": message, "code": 400}})
    with pytest.raises(GatewayError) as refused:
        check_status(400, body)
    assert refused.value.status == 400
    assert passes_over(refused.value) == ("context_length" if context else None)


def scene(urls: dict[str, str], blue: dict[str, Any] | None = None,
          router: dict[str, Any] | None = None) -> dict[str, Any]:
    """acme: deployment blue on w1 (its fallback green), green on w2, router canary over
    both (3:1); other: a deployment of its own on w2."""
    content = registry((), accounts={"acme": KEY, "other": OTHER_KEY}, deployments=[
        {"id": "blue", "account": "acme", "model": MODEL, "default": True,
         "replicas": [{"url": urls["w1"]}], "fallbacks": [GREEN]} | (blue or {}),
        {"id": "green", "account": "acme", "model": MODEL,
         "replicas": [{"url": urls["w2"]}]},
        {"id": "own", "account": "other", "model": "accounts/other/models/o",
         "replicas": [{"url": urls["w2"]}]}])
    content["routers"] = [{"id": "canary", "account": "acme", "model": MODEL,
                           "deployments": [{"deployment": "blue", "weight": 3},
                                           {"deployment": "green", "weight": 1}]}
                          | (router or {})]
    return content


def served_by(seen: list[str]) -> Any:
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.host)
        return httpx.Response(200, json=COMPLETION)
    return handler


def harness(tmp_path: Path, handler: Any, **settings: Any) -> Harness:
    blue, router = settings.pop("blue", None), settings.pop("router", None)
    return build(tmp_path, handler, hosts=("w1", "w2"),
                 registry_of=lambda urls: scene(urls, blue, router),
                 **({"admin_key": ADMIN} | settings))


def test_route_to_a_router_takes_only_ready_deployments_in_rotation(tmp_path: Path) -> None:
    content = scene({"w1": "http://w1:1", "w2": "http://w2:1"}, blue={"state": "disabled"})
    registry_ = Registry(RegistryData.model_validate(content), public_accounts=())
    replicas = ReplicaSet()
    acme = registry_.authenticate(KEY)
    targets = registry_.resolve(CANARY, acme)
    assert [t.name for t in targets.order] == [CANARY]
    picks = {route_to(targets.first, targets, registry_, replicas).deployment.name
             for _ in range(50)}
    assert picks == {GREEN}  # blue is disabled
    blue_targets = registry_.resolve(MODEL, acme)
    assert [t.name for t in blue_targets.order] == [BLUE, GREEN]
    with pytest.raises(TargetUnavailable) as off:
        route_to(blue_targets.first, blue_targets, registry_, replicas)
    assert off.value.reason == "disabled" and off.value.status == 503


async def test_a_router_serves_by_its_weights_and_names_the_deployment(
        tmp_path: Path) -> None:
    seen: list[str] = []
    h = harness(tmp_path, served_by(seen))
    async with h.running() as client:
        answers = [await client.post("/v1/completions", headers=auth(KEY),
                                     json={"model": CANARY, "prompt": "x"})
                   for _ in range(400)]
    assert all(a.status_code == 200 for a in answers)
    names = Counter(a.headers["fireworks-deployment"] for a in answers)
    assert abs(names[BLUE] / 400 - 0.75) < 0.1, names  # 3:1 (the exact share: e2e, unit)
    assert Counter(seen) == {"w1": names[BLUE], "w2": names[GREEN]}
    assert {a.headers["fireworks-router"] for a in answers} == {CANARY}
    assert answers[0].json()["model"] == CANARY  # the model asked for, echoed
    records = h.gateway.ledger.kept
    assert Counter(r.deployment for r in records) == names
    assert {r.router for r in records} == {CANARY} and {r.fallback for r in records} == {""}


async def test_even_load_sends_to_the_deployment_with_less_load(tmp_path: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "w1" and b'"stream":true' in request.content.replace(b" ", b""):
            return httpx.Response(200, stream=Stream([chunk("a"), Pause(1.0), chunk(
                "b", "stop"), b"data: [DONE]\n\n"]))
        return httpx.Response(200, json=COMPLETION)

    h = harness(tmp_path, handler, router={"strategy": "even-load"})
    async with h.running() as client:
        held = [asyncio.create_task(client.post(
            "/v1/completions", headers=auth(KEY),
            json={"model": BLUE, "prompt": "x", "stream": True})) for _ in range(2)]
        while h.gateway.replicas.outstanding[h.urls["w1"]] < 2:
            await asyncio.sleep(0.01)
        answers = [await client.post("/v1/completions", headers=auth(KEY),
                                     json={"model": CANARY, "prompt": "x"})
                   for _ in range(10)]
        await asyncio.gather(*held)
    assert {a.headers["fireworks-deployment"] for a in answers} == {GREEN}


async def test_a_shed_request_goes_to_the_fallback(tmp_path: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "w1":
            return httpx.Response(200, stream=Stream([chunk("a"), Pause(0.5), chunk(
                "b", "stop"), b"data: [DONE]\n\n"]))
        return httpx.Response(200, json=COMPLETION)

    h = harness(tmp_path, handler, blue={"queue_replica_load": 1}, queue_max_length=0)
    async with h.running() as client:
        holder = asyncio.create_task(client.post(
            "/v1/completions", headers=auth(KEY),
            json={"model": MODEL, "prompt": "x", "stream": True}))
        while not h.gateway.replicas.outstanding[h.urls["w1"]]:
            await asyncio.sleep(0.01)
        answer = await client.post("/v1/completions", headers=auth(KEY),
                                   json={"model": MODEL, "prompt": "x"})
        await holder
        metrics = (await client.get("/metrics", headers=auth(ADMIN))).text
    assert answer.status_code == 200, answer.text
    assert answer.headers["fireworks-deployment"] == GREEN
    assert answer.headers["fireworks-fallback"] == f"shed:{BLUE}"
    fell_back = [r for r in h.gateway.ledger.kept if r.fallback]
    assert [(r.deployment, r.fallback, r.status) for r in fell_back] == [
        (GREEN, f"shed:{BLUE}", "ok")]
    assert f'fwgw_fallbacks_total{{reason="shed",target="{BLUE}"}} 1.0' in metrics
    # Both were admitted on blue: counted in flight there, and no longer.
    assert f'fwgw_requests_in_flight{{deployment="{BLUE}"}} 0.0' in metrics


@pytest.mark.parametrize(("blue", "reason"), [
    ({"state": "disabled"}, "disabled"),
    ({"replicas": []}, "no_replica"),
])
async def test_a_disabled_or_empty_target_passes_to_the_fallback(
        tmp_path: Path, blue: dict[str, Any], reason: str) -> None:
    seen: list[str] = []
    h = harness(tmp_path, served_by(seen), blue=blue)
    answer = await h.once("POST", "/v1/completions", key=KEY,
                          json={"model": MODEL, "prompt": "x"})
    assert answer.status_code == 200 and seen == ["w2"]
    assert answer.headers["fireworks-fallback"] == f"{reason}:{BLUE}"
    (record,) = h.gateway.ledger.kept
    assert (record.deployment, record.fallback) == (GREEN, f"{reason}:{BLUE}")


async def test_a_prompt_too_long_for_the_target_goes_to_the_fallback(tmp_path: Path) -> None:
    seen: list[str] = []
    h = harness(tmp_path, too_long_on_w1(seen))
    answer = await h.once("POST", "/v1/completions", key=KEY,
                          json={"model": MODEL, "prompt": "long " * 900})
    assert answer.status_code == 200 and seen == ["w1", "w2"]
    assert answer.headers["fireworks-fallback"] == f"context_length:{BLUE}"
    (record,) = h.gateway.ledger.kept  # one request, one record
    assert (record.deployment, record.status) == (GREEN, "ok")


async def test_no_fallback_for_the_clients_fault_a_limit_or_after_the_first_byte(
        tmp_path: Path) -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.host)
        if b"bad" in request.content:
            return httpx.Response(400, json={"error": {"message": "bad logit_bias"}})
        return httpx.Response(200, stream=Stream([chunk("a"), RESET]))

    def limited_scene(urls: dict[str, str]) -> dict[str, Any]:
        content = scene(urls)
        content["accounts"][0]["limits"] = {"requests_per_minute": 2}
        return content

    h = build(tmp_path, handler, hosts=("w1", "w2"), registry_of=limited_scene)
    async with h.running() as client:
        bad = await client.post("/v1/completions", headers=auth(KEY),
                                json={"model": MODEL, "prompt": "bad"})
        broken = await client.post("/v1/completions", headers=auth(KEY),
                                   json={"model": MODEL, "prompt": "x", "stream": True})
        limited = await client.post("/v1/completions", headers=auth(KEY),
                                    json={"model": MODEL, "prompt": "x"})
    assert bad.status_code == 400 and bad.json()["error"]["message"] == "bad logit_bias"
    assert broken.status_code == 200 and "event: error" in broken.text
    assert limited.status_code == 429
    assert "w2" not in seen and "fireworks-fallback" not in bad.headers


async def test_fallbacks_the_account_cannot_see_are_skipped_and_each_target_tried_once(
        tmp_path: Path) -> None:
    seen: list[str] = []
    own = "accounts/other/deployments/own"
    h = harness(tmp_path, served_by(seen),
                blue={"state": "disabled", "fallbacks": [own, BLUE, GREEN, GREEN]},
                router={"fallbacks": [BLUE]})
    registry_ = h.gateway.store.current
    acme = registry_.authenticate(KEY)
    assert [t.name for t in registry_.resolve(MODEL, acme).order] == [BLUE, GREEN]
    async with h.running() as client:
        answer = await client.post("/v1/completions", headers=auth(KEY),
                                   json={"model": MODEL, "prompt": "x"})
        other = await client.post("/v1/completions", headers=auth(OTHER_KEY),
                                  json={"model": CANARY, "prompt": "x"})
        listed = await client.get("/v1/accounts/acme/routers", headers=auth(KEY))
        hidden = await client.get("/v1/accounts/acme/routers", headers=auth(OTHER_KEY))
    assert answer.status_code == 200 and seen == ["w2"]
    assert other.status_code == 404  # another account's router is not found
    assert [r["name"] for r in listed.json()["routers"]] == [CANARY]
    assert listed.json()["routers"][0]["deployments"][0] == {"deployment": BLUE,
                                                              "weight": 3}
    assert hidden.status_code == 404


async def test_the_last_targets_error_is_the_answer(tmp_path: Path) -> None:
    def both_disabled(urls: dict[str, str]) -> dict[str, Any]:
        content = scene(urls, {"state": "disabled"})
        content["deployments"][1]["state"] = "disabled"
        return content

    h = build(tmp_path, served_by([]), hosts=("w1", "w2"), registry_of=both_disabled)
    answer = await h.once("POST", "/v1/completions", key=KEY,
                          json={"model": MODEL, "prompt": "x"})
    assert answer.status_code == 503
    assert answer.json()["error"]["message"] == f"Deployment {GREEN} is disabled"
    assert not h.gateway.ledger.kept  # refused before admission: no record


def too_long_on_w1(seen: list[str]) -> Any:
    """w1 refuses every prompt as too long for its context (vLLM's 400); w2 answers."""
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "served"}]})
        seen.append(request.url.host)
        if request.url.host == "w1":
            return httpx.Response(400, json={"error": {"message": (
                "This model's maximum context length is 512 tokens. However, your request "
                "has 900 input tokens."), "code": 400}})
        return httpx.Response(200, json=COMPLETION)
    return handler


@pytest.mark.parametrize(("green_default", "status"), [(50, 200), (500, 429)])
async def test_a_fallback_reserves_what_it_may_generate_within_the_budget(
        tmp_path: Path, green_default: int, status: int) -> None:
    """Admitted on blue (16 tokens by default), passed to green, whose default is larger:
    green reserves the difference first, under the account's budget (100 output tokens);
    past it, the request ends with the budget's 429 and green is never asked."""
    def budgeted(urls: dict[str, str]) -> dict[str, Any]:
        content = scene(urls)
        content["accounts"][0]["budgets"] = [{"name": "daily", "window": "day",
                                              "tokens": 100, "input_weight": 0,
                                              "cached_weight": 0}]
        content["deployments"][1]["max_tokens_completion"] = green_default
        return content

    seen: list[str] = []
    h = build(tmp_path, too_long_on_w1(seen), hosts=("w1", "w2"), registry_of=budgeted)
    answer = await h.once("POST", "/v1/completions", key=KEY,
                          json={"model": MODEL, "prompt": "long " * 900})
    assert answer.status_code == status, answer.text
    assert seen == (["w1", "w2"] if status == 200 else ["w1"])
    if status == 429:  # admitted already: not to be sent again as it is
        assert answer.headers["x-should-retry"] == "false"
    (record,) = h.gateway.ledger.kept  # admitted once: one record either way
    assert record.status == ("ok" if status == 200 else "error")
    (spent,) = await h.gateway.limiter.spent("acme", h.gateway.store.current.data
                                             .accounts[0].budgets)
    assert spent.used == (2 if status == 200 else 0)  # COMPLETION's 2 tokens, or nothing


async def test_a_deployment_named_twice_is_tried_once(tmp_path: Path) -> None:
    """canary over blue alone, falling back to blue (again) and green: blue once."""
    seen: list[str] = []
    h = harness(tmp_path, too_long_on_w1(seen),
                router={"deployments": [{"deployment": "blue"}], "fallbacks": [BLUE, GREEN]},
                blue={"fallbacks": []})
    answer = await h.once("POST", "/v1/completions", key=KEY,
                          json={"model": CANARY, "prompt": "long " * 900})
    assert answer.status_code == 200 and seen == ["w1", "w2"]
    assert answer.headers["fireworks-fallback"] == f"context_length:{CANARY}"


async def test_a_router_whose_deployments_are_gone_is_a_503(tmp_path: Path) -> None:
    h = harness(tmp_path, served_by([]), router={"deployments": [{"deployment": "gone"}]})
    answer = await h.once("POST", "/v1/completions", key=KEY,
                          json={"model": CANARY, "prompt": "x"})
    assert answer.status_code == 503
    assert answer.json()["error"]["message"] == f"Router {CANARY} has no deployment ready"
