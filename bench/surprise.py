"""The picture users want: observed mean surprise against the Mirostat target, and the
running mean surprise along the text for Mirostat, top-k and top-p.

Generation runs on the real engine with the plugins (offline vLLM, SmolLM2, float32); the
surprise of every emitted token is recomputed by teacher-forcing the text through
transformers and replaying each sampler's truncation in float64:
    Mirostat   the controller itself (surprise on the kept, renormalised set)
    top-k/p    surprise on the sampler's own truncated, renormalised distribution
    python -m bench.surprise --out docs/mirostat-surprise.png
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

PROMPTS = [
    "Once upon a time in a small village,", "The history of the Roman Empire",
    "Here is a recipe for bread:", "In the year 2050, cities will",
]
TAUS = [1.5, 2.0, 2.5, 3.0, 3.5, 4.0]
LN2 = math.log(2.0)


def log_softmax(z: np.ndarray) -> np.ndarray:
    top = z.max()
    return z - (top + math.log(np.exp(z - top).sum()))


def surprises(logits: np.ndarray, ids: list[int], sampler: dict[str, Any]) -> list[float]:
    out = []
    mu = 2.0 * sampler.get("tau", 0.0)
    for z, x in zip(logits, ids, strict=True):
        logq = log_softmax(z)
        if "tau" in sampler:
            kept = (-logq / LN2) <= mu
        elif "top_k" in sampler:
            kept = np.zeros_like(logq, dtype=bool)
            kept[np.argsort(-logq)[: sampler["top_k"]]] = True
        else:
            order = np.argsort(-logq)
            cumulative = np.cumsum(np.exp(logq[order]))
            kept = np.zeros_like(logq, dtype=bool)
            kept[order[: int(np.searchsorted(cumulative, sampler["top_p"])) + 1]] = True
        kept[int(np.argmax(logq))] = True
        kept[x] = True
        s = float(-(logq[x] - math.log(np.exp(logq[kept]).sum())) / LN2)
        out.append(s)
        if "tau" in sampler:
            mu -= sampler["eta"] * (s - sampler["tau"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", type=Path, default=Path(".data"))
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--out", type=Path, default=Path("docs/mirostat-surprise.png"))
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import LLM, SamplingParams

    from engine_plugins.models import prepare_smollm2
    from engine_plugins.worker import PROCESSORS

    model_dir = prepare_smollm2(args.data_dir.resolve())
    samplers: list[dict[str, Any]] = [{"tau": t, "eta": 0.1} for t in TAUS]
    samplers += [{"top_k": 40}, {"top_p": 0.9}]
    llm = LLM(model=str(model_dir), dtype="float32", max_model_len=1024, seed=0,
              compilation_config={"mode": 0}, logits_processors=PROCESSORS)
    requests, params = [], []
    for sampler in samplers:
        for k, prompt in enumerate(PROMPTS):
            extra = {"mirostat_target": sampler["tau"], "mirostat_lr": sampler["eta"]} \
                if "tau" in sampler else None
            params.append(SamplingParams(
                temperature=1.0, seed=k, max_tokens=args.tokens, min_tokens=args.tokens,
                ignore_eos=True, top_k=sampler.get("top_k", 0),
                top_p=sampler.get("top_p", 1.0), extra_args=extra))
            requests.append((sampler, prompt))
    outputs = llm.generate(PROMPTS * len(samplers), params, use_tqdm=False)
    del llm
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    curves: dict[str, list[list[float]]] = {}
    for (sampler, _prompt), output in zip(requests, outputs, strict=True):
        prompt_ids = list(output.prompt_token_ids)
        ids = list(output.outputs[0].token_ids)
        with torch.no_grad():
            logits = model(torch.tensor([prompt_ids + ids[:-1]])).logits[0]
        logits_np = logits[len(prompt_ids) - 1:].double().numpy()
        label = (f"mirostat tau={sampler['tau']}" if "tau" in sampler else
                 f"top-k {sampler['top_k']}" if "top_k" in sampler else
                 f"top-p {sampler['top_p']}")
        curves.setdefault(label, []).append(surprises(logits_np, ids, sampler))
    del tokenizer
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    observed = [float(np.mean([np.mean(c) for c in curves[f"mirostat tau={t}"]])) for t in TAUS]
    left.plot(TAUS, TAUS, "k--", label="target (identity)")
    left.plot(TAUS, observed, "o-", label="Mirostat: observed mean surprise")
    for label in ("top-k 40", "top-p 0.9"):
        value = float(np.mean([np.mean(c) for c in curves[label]]))
        left.axhline(value, linestyle=":", label=f"{label} (no target): {value:.2f} bits")
    left.set_xlabel("target surprise tau (bits)")
    left.set_ylabel("observed mean surprise (bits)")
    left.set_title("SmolLM2-135M, float32, temperature 1, eta 0.1")
    left.legend(fontsize=8)
    positions = np.arange(1, args.tokens + 1)
    for label in ("mirostat tau=3.0", "top-k 40", "top-p 0.9"):
        mean_curve = np.mean(np.array(curves[label]), axis=0)
        right.plot(positions, np.cumsum(mean_curve) / positions, label=label)
    right.axhline(3.0, color="k", linestyle="--", linewidth=0.8)
    right.set_xlabel("generated tokens")
    right.set_ylabel("running mean surprise (bits)")
    right.set_title("Running mean surprise along the text (tau = 3 for Mirostat)")
    right.legend(fontsize=8)
    figure.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=110)
    for t, o in zip(TAUS, observed, strict=True):
        print(f"tau {t:.1f}: observed mean surprise {o:.3f} bits")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
