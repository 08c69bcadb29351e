"""A LoRA adapter on a real SmolLM2 worker (vLLM's CPU LoRA path), loaded at run time through
the admin API: the gateway's greedy output equals vLLM's own for the adapter, differs from the
base model's, and survives a worker restart; removed, it is a 404; other accounts never see
it. The adapter is made here, deterministically, with peft (rank 8, random non-zero weights
on q_proj and v_proj)."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
import yaml

from gateway.controlplane.registry import hash_key
from gateway.local_stack import Child
from tests.conftest import free_port
from tests.e2e.conftest import API_KEY, OTHER_KEY
from tests.e2e.processes import start_gateway, start_worker

pytestmark = pytest.mark.e2e
ADMIN = "fw_lora_admin"
BASE = "accounts/fireworks/models/lora-base"
TUNED = "accounts/fireworks/models/tuned"
PROMPT = {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
WORKER_ARGS = ("--max-model-len", "2048", "--served-model-name", "smollm2",
               "--enable-lora", "--max-loras", "2", "--max-lora-rank", "8")


def make_adapter(base: Path, out: Path, targets: Sequence[str] = ("q_proj", "v_proj"),
                 seed: int = 1234, rank: int = 8, scale: float = 0.3) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=list(targets), lora_dropout=0.0))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:  # peft starts B at zero: an adapter that changes nothing
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    peft_model.save_pretrained(out)
    return out


class LoraStack:
    def __init__(self, model_dir: Path, tmp: Path) -> None:
        self.model_dir = model_dir
        self.adapter = make_adapter(model_dir, tmp / "adapter")
        self.adapters: dict[str, Path] = {}  # the mixed-batch tests' (see `truth`)
        self.worker_port = free_port()
        self.worker: Child = start_worker(model_dir, self.worker_port, *WORKER_ARGS)
        registry = tmp / "registry.yaml"
        registry.write_text(yaml.safe_dump({
            "accounts": [{"id": "fireworks", "api_keys": [hash_key(API_KEY)]},
                         {"id": "other", "api_keys": [hash_key(OTHER_KEY)]}],
            "deployments": [{"id": "lora-base", "account": "fireworks", "model": BASE,
                             "default": True, "context_length": 2048,
                             "replicas": [{"url": self.worker_url}]}]}))
        port = free_port()
        self.gateway = start_gateway(registry, port, admin_key=ADMIN, public_accounts="[]",
                                     health_check_interval="0.5")
        self.url = f"http://127.0.0.1:{port}"

    @property
    def worker_url(self) -> str:
        return f"http://127.0.0.1:{self.worker_port}"

    def restart_worker(self) -> None:
        self.worker.stop()
        self.worker = start_worker(self.model_dir, self.worker_port, *WORKER_ARGS)

    def complete(self, model: str, key: str = API_KEY) -> httpx.Response:
        return httpx.post(f"{self.url}/inference/v1/completions", timeout=120,
                          headers={"Authorization": f"Bearer {key}"},
                          json={"model": model} | PROMPT)

    def direct(self, model: str) -> str:
        response = httpx.post(f"{self.worker_url}/v1/completions", timeout=120,
                              json={"model": model} | PROMPT)
        assert response.status_code == 200, response.text
        return str(response.json()["choices"][0]["text"])

    def admin(self, method: str, path: str, **body: str) -> httpx.Response:
        return httpx.request(method, f"{self.url}/admin/v1{path}", timeout=300,
                             headers={"Authorization": f"Bearer {ADMIN}"},
                             json=body or None)

    def stop(self) -> None:
        self.gateway.stop()
        self.worker.stop()


@pytest.fixture(scope="module")
def lora_stack(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[LoraStack]:
    stack = LoraStack(smollm2_dir, tmp_path_factory.mktemp("lora"))
    yield stack
    stack.stop()


def test_an_adapter_loaded_through_the_admin_api(lora_stack: LoraStack) -> None:
    added = lora_stack.admin("PUT", "/accounts/fireworks/loras/tuned",
                             deployment="lora-base", source=str(lora_stack.adapter))
    assert added.status_code == 200, added.text
    assert added.json()["replicas"] == {lora_stack.worker_url: True}
    through = lora_stack.complete(TUNED)
    assert through.status_code == 200, through.text
    tuned = through.json()["choices"][0]["text"]
    assert through.json()["model"] == TUNED
    assert tuned == lora_stack.direct("fwlora.fireworks:tuned")  # vLLM's own, for the adapter
    base = lora_stack.complete(BASE).json()["choices"][0]["text"]
    assert base == lora_stack.direct("smollm2") and base != tuned  # the base is unchanged
    assert lora_stack.complete(TUNED, OTHER_KEY).status_code == 404  # other accounts
    models = httpx.get(f"{lora_stack.url}/inference/v1/models", timeout=10,
                       headers={"Authorization": f"Bearer {API_KEY}"}).json()["data"]
    assert any(m["id"] == TUNED and m.get("parent") == BASE for m in models)

    lora_stack.restart_worker()  # a restarted replica has no adapters; it gets them back
    again = lora_stack.complete(TUNED)
    assert again.status_code == 200, again.text
    assert again.json()["choices"][0]["text"] == tuned

    removed = lora_stack.admin("DELETE", "/accounts/fireworks/loras/tuned")
    assert removed.status_code == 200
    assert lora_stack.complete(TUNED).status_code == 404
    listed = httpx.get(f"{lora_stack.worker_url}/v1/models", timeout=10).json()["data"]
    assert [m["id"] for m in listed] == ["smollm2"]  # unloaded from the worker


# Mixed batches: base and adapter requests at the same time on one worker with two LoRA
# slots. Each adapter changes different layers; each request's greedy text must equal the
# text it gets alone (the truth), whatever else shares its batch.
ADAPTERS = {
    "attn": (("q_proj", "k_proj", "v_proj", "o_proj"), 11),
    "mlp": (("gate_proj", "up_proj", "down_proj"), 12),
    "attn-qv": (("q_proj", "v_proj"), 13),
    "mlp-up": (("up_proj", "down_proj"), 14),
}
PROMPTS = ("The capital of France is", "Water boils at", "The largest planet is")


def model_of(adapter: str | None) -> str:
    return BASE if adapter is None else f"accounts/fireworks/models/{adapter}"


def text(stack: LoraStack, adapter: str | None, prompt: str) -> str:
    response = httpx.post(f"{stack.url}/inference/v1/completions", timeout=300,
                          headers={"Authorization": f"Bearer {API_KEY}"},
                          json={"model": model_of(adapter), "prompt": prompt,
                                "max_tokens": 12, "temperature": 0})
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["text"])


def at_once(stack: LoraStack, asks: Sequence[tuple[str | None, str]]) -> list[str]:
    with ThreadPoolExecutor(len(asks)) as pool:
        return list(pool.map(lambda ask: text(stack, *ask), asks))


def load(stack: LoraStack, adapter: str) -> None:
    added = stack.admin("PUT", f"/accounts/fireworks/loras/{adapter}",
                        deployment="lora-base", source=str(stack.adapters[adapter]))
    assert added.status_code == 200, added.text


def unload(stack: LoraStack, adapter: str) -> None:
    assert stack.admin("DELETE", f"/accounts/fireworks/loras/{adapter}").status_code == 200


@pytest.fixture(scope="module")
def truth(lora_stack: LoraStack, tmp_path_factory: pytest.TempPathFactory
          ) -> dict[tuple[str | None, str], str]:
    """Every (adapter, prompt)'s text asked alone: the four adapters, then the base."""
    out = tmp_path_factory.mktemp("adapters")
    lora_stack.adapters = {name: make_adapter(lora_stack.model_dir, out / name, targets,
                                              seed, rank=4, scale=0.2)
                           for name, (targets, seed) in ADAPTERS.items()}
    texts: dict[tuple[str | None, str], str] = {}
    for adapter in ADAPTERS:
        load(lora_stack, adapter)
        texts.update({(adapter, prompt): text(lora_stack, adapter, prompt)
                      for prompt in PROMPTS})
    texts.update({(None, prompt): text(lora_stack, None, prompt) for prompt in PROMPTS})
    for prompt in PROMPTS:  # each adapter really changes the answer
        assert len({texts[adapter, prompt] for adapter in (None, *ADAPTERS)}) == 5, texts
    return texts


def mismatches(truth: dict[tuple[str | None, str], str],
               asks: Sequence[tuple[str | None, str]], got: Sequence[str]) -> list[str]:
    return [f"{adapter or 'base'} / {prompt!r}: {answer!r}, alone {truth[adapter, prompt]!r}"
            for (adapter, prompt), answer in zip(asks, got, strict=True)
            if answer != truth[adapter, prompt]]


def test_base_and_adapters_in_one_batch(lora_stack: LoraStack,
                                        truth: dict[tuple[str | None, str], str]) -> None:
    """The base requests used to come back as another adapter's text (vLLM's CPU kernels
    gave them the last LoRA slot; engine_plugins/lora_rows.py corrects it)."""
    asks = [(adapter, prompt) for prompt in PROMPTS for adapter in (None, "attn", "mlp")]
    for _ in range(3):
        assert mismatches(truth, asks, at_once(lora_stack, asks)) == []


def test_adapters_loaded_and_unloaded_while_others_run(
        lora_stack: LoraStack, truth: dict[tuple[str | None, str], str]) -> None:
    """Loading an adapter takes a LoRA slot while requests of other adapters are in flight:
    none of them is served with the wrong adapter."""
    for adapter in ("attn-qv", "mlp-up"):
        unload(lora_stack, adapter)
    asks = [(adapter, prompt) for prompt in PROMPTS for adapter in (None, "attn", "mlp")] * 2
    with ThreadPoolExecutor(1) as background:
        running = background.submit(lambda: [at_once(lora_stack, asks) for _ in range(3)])
        churn: list[str] = []
        while not running.done():
            for adapter in ("attn-qv", "mlp-up"):
                load(lora_stack, adapter)
                churn += mismatches(truth, [(adapter, PROMPTS[0])],
                                    [text(lora_stack, adapter, PROMPTS[0])])
                unload(lora_stack, adapter)
        rounds = running.result()
    assert [mismatches(truth, asks, got) for got in rounds] == [[], [], []]
    assert churn == []


def test_more_adapters_than_slots(lora_stack: LoraStack,
                                  truth: dict[tuple[str | None, str], str]) -> None:
    """Four adapters in use at once on two LoRA slots: requests wait for a slot (vLLM's
    scheduler admits at most --max-loras adapters per batch), each gets its own adapter.
    What waiting costs is printed: one round of 12 requests over 2 adapters, then over 4."""
    for adapter in ("attn-qv", "mlp-up"):
        load(lora_stack, adapter)
    two = [(adapter, prompt) for prompt in PROMPTS for adapter in ("attn", "mlp")] * 2
    four = [(adapter, prompt) for prompt in PROMPTS for adapter in ADAPTERS]
    seconds = {}
    for name, asks in (("2 adapters", two), ("4 adapters", four)):
        started = time.perf_counter()
        got = at_once(lora_stack, asks)
        seconds[name] = time.perf_counter() - started
        assert mismatches(truth, asks, got) == []
    print(f"12 requests at once on 2 LoRA slots: {seconds}")
