"""Engine-plugin throughput: `make bench-plugins` (not a timed test).

Offline vLLM engine, SmolLM2 in float32, prompts of 128 tokens, exactly N generated tokens,
batch sizes 1, 8 and 32; one warm-up, then the median of R repeats, all in one run:
    baseline      engine without plugins
    unused        plugins loaded, no request uses them
    mirostat-all  Mirostat on every row
    mirostat-half Mirostat on half of the rows
    rep-native    repetition_penalty=1.3 through vLLM's native field
    rep-plugin    repetition_penalty=1.3 through the plugin
Prints tokens/s and the ratio to the baseline of the same batch size.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
from pathlib import Path
from typing import Any


def sampling(kind: str, row: int, tokens: int) -> Any:
    from vllm import SamplingParams

    extra: dict[str, Any] | None = None
    native_penalty = 1.0
    if kind == "mirostat-all" or (kind == "mirostat-half" and row % 2 == 0):
        extra = {"mirostat_target": 3.0, "mirostat_lr": 0.1}
    elif kind == "rep-native":
        native_penalty = 1.3
    elif kind == "rep-plugin":
        extra = {"repetition_penalty": 1.3}
    return SamplingParams(temperature=1.0, seed=row, max_tokens=tokens, min_tokens=tokens,
                          ignore_eos=True, repetition_penalty=native_penalty,
                          extra_args=extra)


def measure(llm: Any, kind: str, batch: int, tokens: int, repeats: int) -> float:
    prompts = [{"prompt_token_ids": [(row * 7919 + i * 31) % 40000 + 100 for i in range(128)]}
               for row in range(batch)]
    params = [sampling(kind, row, tokens) for row in range(batch)]
    llm.generate(prompts, params, use_tqdm=False)  # warm-up
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        generated = sum(len(o.outputs[0].token_ids) for o in outputs)
        assert generated == batch * tokens, generated
        rates.append(generated / elapsed)
    rate = statistics.median(rates)
    print(f"[bench] {kind:<14} batch {batch:>3}: {rate:8.1f} tokens/s "
          f"(repeats: {', '.join(f'{r:.1f}' for r in rates)})", flush=True)
    return rate


def engine(model: Path, plugins: bool) -> Any:
    from vllm import LLM

    from engine_plugins.worker import PROCESSORS

    return LLM(model=str(model), dtype="float32", max_model_len=1024, seed=0,
               compilation_config={"mode": 0},  # as the tests run it: no torch.compile
               logits_processors=PROCESSORS if plugins else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", type=Path, default=Path(".data"))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    from engine_plugins.models import prepare_smollm2

    model = prepare_smollm2(args.data_dir.resolve())
    results: dict[tuple[str, int], float] = {}
    llm = engine(model, plugins=False)
    for batch in args.batches:
        results["baseline", batch] = measure(llm, "baseline", batch, args.tokens, args.repeats)
    del llm
    gc.collect()
    llm = engine(model, plugins=True)
    kinds = ["unused", "mirostat-all", "mirostat-half", "rep-native", "rep-plugin"]
    for batch in args.batches:
        for kind in kinds:
            results[kind, batch] = measure(llm, kind, batch, args.tokens, args.repeats)
    print(f"\nSmolLM2-135M float32, 128-token prompts, {args.tokens} generated tokens, "
          f"median of {args.repeats} after one warm-up (tokens/s; ratio to baseline)")
    header = f"{'configuration':<15}" + "".join(f"{'batch ' + str(b):>22}"
                                                 for b in args.batches)
    print(header)
    print("-" * len(header))
    for kind in ["baseline", *kinds]:
        cells = []
        for batch in args.batches:
            rate = results[kind, batch]
            cells.append(f"{rate:>12.1f} ({rate / results['baseline', batch]:.3f})")
        print(f"{kind:<15}" + "".join(f"{c:>22}" for c in cells))
    for batch in args.batches:
        native, plugin = results["rep-native", batch], results["rep-plugin", batch]
        print(f"batch {batch}: repetition plugin / native = {plugin / native:.3f}")


if __name__ == "__main__":
    main()
