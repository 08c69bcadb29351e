"""What following the workers' KV-cache events costs one gateway (`python -m bench.kv_index`;
not a test): batches encoded as vLLM's publisher encodes them, decoded and applied to the
index, and lookups of a request's prefix, with the index as large as `--blocks` cached
blocks on each of `--pods` pods.

Each gateway replica applies every pod's events itself (gateway/dataplane/kv_events.py); this
is the number that decides whether that is cheaper than one shared index in Redis.
"""

from __future__ import annotations

import argparse
import gc
import random
import time
import tracemalloc

import msgspec
from vllm.distributed.kv_events import BlockRemoved, BlockStored, KVEventBatch

from gateway.dataplane.kv_index import DECODER, BlockIndex, prompt_keys

BLOCK = 128  # vLLM's block size on the CPU


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pods", type=int, default=8)
    parser.add_argument("--blocks", type=int, default=20_000, help="cached per pod")
    parser.add_argument("--prompt-blocks", type=int, default=16)
    args = parser.parse_args()
    encode = msgspec.msgpack.Encoder().encode
    rng = random.Random(1)
    # Runs of 4 blocks (a 512-token prompt), each pod's own, as a busy pod stores them.
    batches: list[tuple[str, bytes]] = []
    runs: list[list[int]] = []
    for pod in range(args.pods):
        for run in range(args.blocks // 4):
            tokens = [rng.randrange(50_000) for _ in range(4 * BLOCK)]
            hashes: list[bytes | int] = [rng.getrandbits(64) for _ in range(4)]
            event = BlockStored(block_hashes=hashes, parent_block_hash=None,
                                token_ids=tokens, block_size=BLOCK, lora_id=None,
                                medium="GPU", lora_name=None, extra_keys=[("salt",), None,
                                                                          None, None])
            batches.append((f"pod{pod}", encode(KVEventBatch(ts=time.time(), events=[event]))))
            if pod == 0 and run < 100:
                runs.append(tokens)
    gc.collect()
    tracemalloc.start()  # the index's size (tracing slows Python: timed apart, below)
    traced = BlockIndex()
    for pod, payload in batches:
        traced.apply(pod, DECODER.decode(payload))
    memory, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del traced
    index = BlockIndex()
    start = time.perf_counter()
    for pod, payload in batches:
        index.apply(pod, DECODER.decode(payload))
    applied = time.perf_counter() - start
    blocks = len(batches) * 4
    pods = [f"pod{i}" for i in range(args.pods)]
    prompts = [run * (args.prompt_blocks // 4) for run in runs]
    start = time.perf_counter()
    for tokens in prompts:
        index.cached(prompt_keys(tokens, BLOCK, None, "salt"), pods)
    looked = (time.perf_counter() - start) / len(prompts)
    removal = encode(KVEventBatch(ts=time.time(), events=[
        BlockRemoved(block_hashes=list(index.pods["pod1"].keys)[:4], medium="GPU")]))
    start = time.perf_counter()
    index.apply("pod1", DECODER.decode(removal))
    removed = time.perf_counter() - start
    print(f"{args.pods} pods x {args.blocks} cached blocks of {BLOCK} tokens "
          f"({blocks} blocks in all)")
    print(f"apply a stored block (decode + key + index): {applied / blocks * 1e6:8.1f} us")
    print(f"apply a removal of 4 blocks:                 {removed * 1e6:8.1f} us")
    print(f"look up a {args.prompt_blocks}-block prompt on {args.pods} pods (keys + lookups): "
          f"{looked * 1e6:8.1f} us")
    print(f"index memory: {memory / blocks:8.0f} bytes per cached block "
          f"({memory / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()
