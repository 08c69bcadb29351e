"""Mirostat on the real engine holds the observed surprise at the target, and an
independent replay (transformers, teacher-forced, controller in float64) agrees with every
token the engine emitted."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.e2e.test_engine_plugins import PROMPTS, complete_all

pytestmark = pytest.mark.e2e

TAUS = (2.0, 3.0)
ETA = 0.1
TOKENS = 300
SEEDS = (11, 12)
NEAR_MU_BITS = 1e-3


def replay(logits: np.ndarray, emitted: list[int], tau: float, eta: float
           ) -> tuple[list[float], int, int]:
    """Re-run the controller in float64 on teacher-forced logits [N, V].
    Returns (observed surprises, tokens outside the kept set, of which near mu)."""
    mu = 2.0 * tau
    surprises: list[float] = []
    outside = near = 0
    for z, x in zip(logits, emitted, strict=True):
        logq = z - (z.max() + math.log(np.exp(z - z.max()).sum()))
        surprise = -logq / math.log(2.0)
        kept = surprise <= mu
        kept[int(np.argmax(z))] = True
        if not kept[x]:
            outside += 1
            near += abs(surprise[x] - mu) < NEAR_MU_BITS
            kept[x] = True
        log_mass = math.log(np.exp(logq[kept]).sum())
        s = float(-(logq[x] - log_mass) / math.log(2.0))
        surprises.append(s)
        mu -= eta * (s - tau)
    return surprises, outside, near


@pytest.fixture(scope="module")
def runs(smollm2_worker: str) -> list[dict[str, Any]]:
    bodies = [{"prompt": prompt, "temperature": 1.0, "seed": seed, "max_tokens": TOKENS,
               "ignore_eos": True, "return_token_ids": True,
               "vllm_xargs": {"mirostat_target": tau, "mirostat_lr": ETA}}
              for tau in TAUS for prompt in PROMPTS for seed in SEEDS]
    results = asyncio.run(complete_all(smollm2_worker, bodies))
    return [{"tau": body["vllm_xargs"]["mirostat_target"],
             "prompt_ids": result["choices"][0]["prompt_token_ids"]
             or result["prompt_token_ids"],
             "ids": result["choices"][0]["token_ids"]}
            for body, result in zip(bodies, results, strict=True)]


def test_surprise_converges_and_replay_agrees(runs: list[dict[str, Any]],
                                             smollm2_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    model.eval()
    errors: dict[float, list[float]] = {tau: [] for tau in TAUS}
    total = outside_far = near = 0
    for run in runs:
        prompt, ids = list(run["prompt_ids"]), list(run["ids"])
        assert len(ids) == TOKENS
        with torch.no_grad():
            out = model(torch.tensor([prompt + ids[:-1]])).logits[0]
        logits = out[len(prompt) - 1:].double().numpy()
        surprises, outside, close = replay(logits, ids, run["tau"], ETA)
        errors[run["tau"]].append(abs(float(np.mean(surprises)) - run["tau"]))
        total += len(ids)
        outside_far += outside - close
        near += close
    for tau, errs in errors.items():
        print(f"tau={tau}: median |mean surprise - tau| = {np.median(errs):.4f} bits "
              f"(max {max(errs):.4f}) over {len(errs)} runs")
    print(f"replay: {total} tokens, {near} near mu, {outside_far} outside the kept set")
    for tau, errs in errors.items():
        assert len(errs) == len(PROMPTS) * len(SEEDS)
        assert float(np.median(errs)) <= 0.15, (tau, errs)
    assert outside_far == 0, f"{outside_far} emitted tokens outside the replay's kept set"
    assert near <= 0.005 * total, (near, total)
