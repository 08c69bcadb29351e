"""The GGUF -> Hugging Face conversion of the default model, checked with transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def smollm2(data_dir: Path) -> Path:
    from engine_plugins.models import prepare_smollm2

    return prepare_smollm2(data_dir)


def test_directory_has_everything_vllm_needs(smollm2: Path) -> None:
    for name in ("model.safetensors", "config.json", "tokenizer.json",
                 "generation_config.json", ".complete"):
        assert (smollm2 / name).exists(), name
    config = json.loads((smollm2 / "config.json").read_text())
    assert config["num_hidden_layers"] == 30 and config["num_key_value_heads"] == 3
    assert config["rms_norm_eps"] == 1e-5
    generation = json.loads((smollm2 / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2


def test_greedy_answer_names_paris(smollm2: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                           tokenize=False)
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    output = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(output[0][inputs["input_ids"].shape[1]:],
                              skip_special_tokens=True)
    assert "Paris" in answer


def test_tiny_model_is_deterministic(data_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from engine_plugins.models import prepare_tiny

    cached = prepare_tiny(data_dir)
    fresh = prepare_tiny(tmp_path)
    a, b = load_file(cached / "model.safetensors"), load_file(fresh / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(bool((a[k] == b[k]).all()) for k in a)
    assert json.loads((fresh / "config.json").read_text())["head_dim"] == 64
