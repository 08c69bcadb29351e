from __future__ import annotations

import pytest

from gateway.controlplane import registry as registry_module
from gateway.controlplane.registry import (
    Account,
    Deployment,
    Registry,
    RegistryData,
    Replica,
    hash_key,
)
from gateway.errors import GatewayError

MODEL = "accounts/fireworks/models/llama"


def registry() -> Registry:
    replica = [Replica(url="http://w:1")]
    return Registry(RegistryData(
        accounts=[Account(id="fireworks", api_keys=[hash_key("k-fw")]),
                  Account(id="alice", api_keys=[hash_key("k-alice")]),
                  Account(id="bob", api_keys=[hash_key("k-bob")])],
        deployments=[
            Deployment(id="llama-a", account="fireworks", model=MODEL, replicas=replica),
            Deployment(id="llama-b", account="fireworks", model=MODEL, default=True,
                       replicas=replica),
            Deployment(id="mine", account="alice", model="accounts/alice/models/tuned",
                       default=True, replicas=replica),
        ]))


def test_keys_are_checked_against_hashes() -> None:
    assert registry().authenticate("k-alice").id == "alice"
    for bad in ("", None, "k-nobody"):
        with pytest.raises(GatewayError) as info:
            registry().authenticate(bad)
        assert info.value.status == 401


def test_model_goes_to_its_default_deployment() -> None:
    alice = registry().authenticate("k-alice")
    assert registry().resolve(MODEL, alice).first.id == "llama-b"


def test_short_forms_expand_to_public_models() -> None:
    alice = registry().authenticate("k-alice")
    assert registry().resolve("llama", alice).first.id == "llama-b"
    assert registry().resolve("fireworks/llama", alice).first.id == "llama-b"


def test_deployment_and_pinned_forms() -> None:
    alice = registry().authenticate("k-alice")
    assert registry().resolve("accounts/fireworks/deployments/llama-a",
                              alice).first.id == "llama-a"
    pinned = f"{MODEL}#accounts/fireworks/deployments/llama-a"
    route = registry().resolve(pinned, alice)
    assert route.first.id == "llama-a" and route.requested_model == pinned


def test_pinning_checks_the_deployment_serves_the_model() -> None:
    alice = registry().authenticate("k-alice")
    with pytest.raises(GatewayError) as info:
        registry().resolve("accounts/fireworks/models/other#accounts/fireworks/deployments/"
                           "llama-a", alice)
    assert info.value.status == 404


def test_other_accounts_are_invisible() -> None:
    bob = registry().authenticate("k-bob")
    errors = []
    for ref in ("accounts/alice/deployments/mine", "accounts/alice/models/tuned",
                "accounts/alice/deployments/absent"):
        with pytest.raises(GatewayError) as info:
            registry().resolve(ref, bob)
        errors.append((info.value.status, info.value.param))
    assert errors == [(404, "model")] * 3
    alice = registry().authenticate("k-alice")
    assert registry().resolve("accounts/alice/models/tuned", alice).first.id == "mine"


def test_keys_file_is_merged_into_accounts(tmp_path) -> None:  # type: ignore[no-untyped-def]
    registry_file = tmp_path / "registry.yaml"
    registry_file.write_text("accounts: [{id: acme}]\ndeployments: []\n")
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(f"acme: ['{hash_key('k1')}']\nnew: ['{hash_key('k2')}']\n")
    loaded = Registry.from_yaml(registry_file, keys_file)
    assert loaded.authenticate("k1").id == "acme"
    assert loaded.authenticate("k2").id == "new"


@pytest.mark.parametrize("url", ["http://[::1", "http://h:800l", "http://h:80011",
                                 "ftp://h", "h:8000", "http://:8000", "http://h:0"])
def test_replica_urls_are_checked_when_the_registry_is_loaded(url: str) -> None:
    with pytest.raises(ValueError):
        Replica(url=url)


def test_registry_floats_must_be_finite() -> None:
    for value in ("NaN", "Infinity", "-Infinity"):
        with pytest.raises(ValueError):
            Deployment.model_validate_json(
                '{"id": "d", "account": "a", "model": "m", "generation_config": '
                f'{{"temperature": "{value}"}}}}')


@pytest.mark.parametrize("model,pin,expected", [
    (MODEL, "accounts/fireworks/deployments/llama-a", "llama-a"),  # the header pins
    (MODEL, "llama-a", "llama-a"),  # short form, as `#` takes it
    (MODEL, "accounts/fireworks/deployments/llama-b", "llama-b"),
    (f"{MODEL}#accounts/fireworks/deployments/llama-a", "accounts/fireworks/deployments/llama-a",
     "llama-a"),  # both say the same
    ("accounts/fireworks/deployments/llama-a", "accounts/fireworks/deployments/llama-a",
     "llama-a"),
    (f"{MODEL}#accounts/fireworks/deployments/llama-b", "accounts/fireworks/deployments/llama-a",
     None),  # two pins that disagree
    ("accounts/fireworks/deployments/llama-b", "accounts/fireworks/deployments/llama-a", None),
    (MODEL, "accounts/alice/deployments/mine", None),  # not a deployment of this model
    (MODEL, "accounts/fireworks/deployments/nope", None),
])
def test_the_deployment_header_pins(model: str, pin: str, expected: str | None) -> None:
    alice = registry().authenticate("k-alice")
    if expected is None:
        with pytest.raises(GatewayError) as info:
            registry().resolve(model, alice, pin)
        assert info.value.status == 404 and pin in info.value.message
        return
    route = registry().resolve(model, alice, pin)
    assert route.first.id == expected and route.requested_model == model


def test_a_pin_to_another_accounts_deployment_is_not_found() -> None:
    bob = registry().authenticate("k-bob")
    with pytest.raises(GatewayError) as info:
        registry().resolve("accounts/alice/models/tuned", bob,
                           "accounts/alice/deployments/mine")
    assert info.value.status == 404


def test_what_a_snapshot_keeps_answers_as_a_fresh_lookup_would() -> None:
    """A Registry keeps the accounts of recent keys and the routes of recent model ids
    (gateway/controlplane/registry.py): the same answers, only what was found, bounded;
    and a change (a new snapshot) forgets them."""
    reg = registry()
    alice = reg.authenticate("k-alice")
    assert reg.authenticate("k-alice") is alice
    first = reg.resolve(MODEL, alice)
    assert reg.resolve(MODEL, alice) is first and first.first.id == "llama-b"
    with pytest.raises(GatewayError):
        reg.resolve("accounts/bob/models/x", alice)
    with pytest.raises(GatewayError):  # the failure is not kept: still refused
        reg.resolve("accounts/bob/models/x", alice)
    for n in range(registry_module.KEPT + 10):  # bounded, however many ids resolved
        registry_module._keep(reg._routes, (f"id-{n}", "alice", None), first)
    assert len(reg._routes) <= registry_module.KEPT
    assert reg.resolve(MODEL, alice) == first
    # The key revoked: a new snapshot without it refuses it.
    data = reg.data.model_copy(deep=True)
    data.accounts = [a for a in data.accounts if a.id != "alice"]
    with pytest.raises(GatewayError) as info:
        Registry(data).authenticate("k-alice")
    assert info.value.status == 401


def routed() -> Registry:
    """alice: deployments a, b (a falls back to b, to bob's c, to the public p), router r
    over a and b (the model's default, falling back to p); bob: deployment c, router s."""
    replica = [Replica(url="http://w:1")]
    tuned = "accounts/alice/models/m"

    def made(name: str, account: str = "alice", **fields: object) -> Deployment:
        return Deployment.model_validate({"id": name, "account": account, "model": tuned,
                                          "replicas": replica} | fields)

    return Registry(RegistryData.model_validate({
        "accounts": [{"id": "alice", "api_keys": [hash_key("k-alice")]},
                     {"id": "bob", "api_keys": [hash_key("k-bob")]}],
        "deployments": [
            made("a", fallbacks=["accounts/bob/deployments/c", "accounts/alice/deployments/b",
                                 "accounts/fireworks/deployments/p",
                                 "accounts/alice/deployments/a",
                                 "accounts/alice/deployments/gone"]).model_dump(),
            made("b", default=True).model_dump(), made("c", "bob").model_dump(),
            made("p", "fireworks").model_dump()],
        "routers": [
            {"id": "r", "account": "alice", "model": tuned, "default": True,
             "deployments": [{"deployment": "a", "weight": 2}, {"deployment": "b"},
                             {"deployment": "missing"}],
             "fallbacks": ["accounts/fireworks/deployments/p"]},
            {"id": "s", "account": "bob", "model": tuned,
             "deployments": [{"deployment": "c"}]}]}))


A, B, P, R = ("accounts/alice/deployments/a", "accounts/alice/deployments/b",
              "accounts/fireworks/deployments/p", "accounts/alice/routers/r")


@pytest.mark.parametrize(("model", "pin", "order"), [
    ("accounts/alice/models/m", None, [R, P]),  # the default router before the default b
    (R, None, [R, P]),
    (A, None, [A, B, P]),  # bob's c unseen, a itself and a missing one skipped
    (B, None, [B]),
    (f"{R}#{A}", None, [A, B, P]),  # a pin within the router: that deployment
    (R, B, [B]),
    ("accounts/bob/routers/s", None, None),  # another account's router
    (f"{R}#accounts/bob/deployments/c", None, None),  # a pin outside the router
])
def test_targets_of_routers_pins_and_fallbacks(model: str, pin: str | None,
                                               order: list[str] | None) -> None:
    alice = routed().authenticate("k-alice")
    if order is None:
        with pytest.raises(GatewayError) as missing:
            routed().resolve(model, alice, pin)
        assert missing.value.status == 404
        return
    assert [t.name for t in routed().resolve(model, alice, pin).order] == order


def test_a_routers_missing_deployments_are_left_out() -> None:
    registry_ = routed()
    router = next(r for r in registry_.data.routers if r.id == "r")
    assert [(d.name, w) for d, w in registry_.deployments_of(router)] == [(A, 2), (B, 1)]


def test_bad_routers_and_budgets_are_refused() -> None:
    for bad in ({"deployments": []}, {"strategy": "round-robin"},
                {"fallbacks": ["accounts/a/models/m"]},
                {"deployments": [{"deployment": "a", "weight": 0}]}):
        with pytest.raises(ValueError):
            RegistryData.model_validate({"routers": [
                {"id": "r", "account": "a", "model": "m",
                 "deployments": [{"deployment": "a"}]} | bad]})
    twice = {"name": "d", "window": "day", "tokens": 5}
    for budgets in ([twice, twice], [twice | {"tokens": 0}], [twice | {"window": "week"}],
                    [twice | {"output_weight": -1}], [twice | {"name": "Has Space"}]):
        with pytest.raises(ValueError):
            Account.model_validate({"id": "a", "budgets": budgets})
