"""A correction for vLLM 0.32's CPU LoRA kernels: tokens without an adapter stay the base's.

The cause. vLLM marks a token that uses no adapter with the LoRA index -1. The GPU (Triton)
kernels skip such rows. The PyTorch kernels that the CPU runner uses
(`vllm.lora.ops.torch_ops`, called by `PunicaWrapperCPU`) select each row's weights with
`lora_weights[indices]`, and in PyTorch index -1 is the *last* slot. So as soon as one
request in a batch has an adapter (the wrapper skips batches without any), every base-model
token in that batch is run through the adapter in slot `max_loras - 1`: the base request's
text is corrupted while the adapters' own texts stay right. A batch of base requests only,
or adapters only, is not affected, which is why it shows only under mixed traffic.

The correction wraps the three row-wise kernels (`bgmv_shrink`, `bgmv_expand`,
`bgmv_expand_slice`; the `sgmv_*` ones call them) so that a row with index -1 contributes
nothing, as on the GPU: its input row is zeroed before the shared computation, and an
expand that overwrites instead of adding leaves that row as it was. Rows with an adapter are
computed exactly as before (the product is row by row).

It is loaded in every vLLM process through the `vllm.general_plugins` entry point, and only
on the vLLM version it was written for: the kernels are internal and change between
releases, so on another version it logs that it was not applied and leaves vLLM alone.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the launcher imports this module; torch loads only inside vLLM
    import torch

WRITTEN_FOR = "0.32.0"
# The worker launcher's --no-plugins sets this to start stock vLLM (for comparisons).
DISABLE_ENV = "ENGINE_PLUGINS_CORRECTIONS"
KERNELS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")
MODULES = ("vllm.lora.ops.torch_ops.lora_ops", "vllm.lora.ops.torch_ops",
           "vllm.lora.punica_wrapper.punica_cpu")
_CORRECTED = "__engine_plugins_corrected__"
logger = logging.getLogger(__name__)


def _without_adapter(inputs: torch.Tensor, indices: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(inputs with no-adapter rows zeroed, indices with -1 as slot 0, those rows' mask)."""
    absent = indices < 0
    if not bool(absent.any()):
        return inputs, indices, None
    return inputs.masked_fill(absent.unsqueeze(-1), 0), indices.clamp_min(0), absent


def corrected_kernels(ops: Any) -> dict[str, Callable[..., None]]:
    """vLLM's three row-wise kernels from `ops` (its torch_ops module), corrected."""
    bgmv_shrink, bgmv_expand, bgmv_expand_slice = (getattr(ops, name) for name in KERNELS)

    def shrink(inputs: torch.Tensor, weights: torch.Tensor, output: torch.Tensor,
               indices: torch.Tensor, scaling: float = 1.0) -> None:
        inputs, indices, _ = _without_adapter(inputs, indices)
        bgmv_shrink(inputs, weights, output, indices, scaling)  # zero rows give zeros

    def expand(inputs: torch.Tensor, weights: torch.Tensor, output: torch.Tensor,
               indices: torch.Tensor, add_inputs: bool = True) -> None:
        inputs, indices, absent = _without_adapter(inputs, indices)
        with _rows_kept(output, absent, slice(None), add_inputs):
            bgmv_expand(inputs, weights, output, indices, add_inputs)

    def expand_slice(inputs: torch.Tensor, weights: torch.Tensor, output: torch.Tensor,
                     indices: torch.Tensor, slice_offset: int, slice_size: int,
                     add_inputs: bool = True) -> None:
        inputs, indices, absent = _without_adapter(inputs, indices)
        columns = slice(slice_offset, slice_offset + slice_size)
        with _rows_kept(output, absent, columns, add_inputs):
            bgmv_expand_slice(inputs, weights, output, indices, slice_offset, slice_size,
                              add_inputs)

    kernels: dict[str, Callable[..., None]] = {
        "bgmv_shrink": shrink, "bgmv_expand": expand, "bgmv_expand_slice": expand_slice}
    for name, kernel in kernels.items():
        functools.update_wrapper(kernel, getattr(ops, name))
        setattr(kernel, _CORRECTED, True)
    return kernels


@contextlib.contextmanager
def _rows_kept(output: torch.Tensor, absent: torch.Tensor | None, columns: slice,
               add_inputs: bool) -> Iterator[None]:
    """An expand that adds gives zero rows nothing to add; one that overwrites would write
    zeros there, so those rows are put back as they were (the GPU kernel skips them)."""
    if add_inputs or absent is None or absent.shape[0] != output.shape[0]:
        yield
        return
    kept = output[absent, columns].clone()
    yield
    output[absent, columns] = kept


def register() -> None:
    """The `vllm.general_plugins` entry point: runs once in each vLLM process."""
    if os.environ.get(DISABLE_ENV, "").lower() in {"0", "off", "false"}:
        return
    import vllm

    if vllm.__version__ != WRITTEN_FOR:
        logger.warning("engine_plugins.lora_rows was written for vLLM %s, not %s: not "
                       "applied (check whether base requests in a batch with LoRA "
                       "adapters still get the last adapter on CPU)", WRITTEN_FOR,
                       vllm.__version__)
        return
    install(setattr)


def install(assign: Callable[[Any, str, Any], None]) -> None:
    """Puts the corrected kernels wherever vLLM looks them up (`assign` is `setattr`, or a
    test's monkeypatch)."""
    import importlib

    lora_ops = importlib.import_module(MODULES[0])
    if getattr(lora_ops.bgmv_shrink, _CORRECTED, False):
        return  # plugins may load twice in one process
    kernels = corrected_kernels(lora_ops)
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        for name in KERNELS:
            if hasattr(module, name):
                assign(module, name, kernels[name])
