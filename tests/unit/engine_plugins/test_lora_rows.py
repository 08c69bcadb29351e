"""engine_plugins.lora_rows against vLLM 0.32's own CPU LoRA code: in a batch that mixes
tokens with and without an adapter, the stock kernels give the no-adapter tokens the last
slot's adapter (the cause of corrupted base answers); corrected, those tokens get nothing
and the adapter tokens get exactly what they got before."""

from __future__ import annotations

import logging

import pytest
import torch
import vllm
from vllm.lora.layers import LoRAMapping
from vllm.lora.ops import torch_ops
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

from engine_plugins import lora_rows

HIDDEN, RANK, OUT, SLOTS = 16, 4, 24, 2
# Token rows: adapter in slot 0, base, adapter in slot 1, base, base.
SLOT_OF_ROW = torch.tensor([0, -1, 1, -1, -1])
SCALE = 0.5


@pytest.fixture
def weights() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    lora_a = torch.randn(SLOTS, 1, RANK, HIDDEN, generator=generator)
    lora_b = torch.randn(SLOTS, 1, OUT, RANK, generator=generator)
    return lora_a, lora_b


@pytest.fixture
def inputs() -> torch.Tensor:
    return torch.randn(len(SLOT_OF_ROW), HIDDEN, generator=torch.Generator().manual_seed(8))


def reference_delta(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor
                    ) -> torch.Tensor:
    """What LoRA adds to each row, written out row by row: nothing for a base row."""
    rows = []
    for row, slot in zip(x, SLOT_OF_ROW.tolist(), strict=True):
        if slot < 0:
            rows.append(torch.zeros(OUT))
        else:
            rows.append(lora_b[slot, 0] @ (lora_a[slot, 0] @ row * SCALE))
    return torch.stack(rows)


def test_stock_kernels_give_base_rows_the_last_slot(
        weights: tuple[torch.Tensor, torch.Tensor], inputs: torch.Tensor) -> None:
    lora_a, _ = weights
    shrunk = torch.zeros(len(SLOT_OF_ROW), RANK)
    torch_ops.bgmv_shrink(inputs, lora_a, shrunk, SLOT_OF_ROW, SCALE)
    last_slot = inputs[1] @ lora_a[SLOTS - 1, 0].T * SCALE
    assert torch.allclose(shrunk[1], last_slot)  # the cause: index -1 is the last slot
    assert shrunk[1].abs().sum() > 0


@pytest.mark.parametrize("add_inputs", [True, False])
def test_corrected_kernels_leave_base_rows_alone(
        weights: tuple[torch.Tensor, torch.Tensor], inputs: torch.Tensor,
        add_inputs: bool) -> None:
    lora_a, lora_b = weights
    kernels = lora_rows.corrected_kernels(torch_ops)
    shrunk = torch.zeros(len(SLOT_OF_ROW), RANK)
    kernels["bgmv_shrink"](inputs, lora_a, shrunk, SLOT_OF_ROW, SCALE)
    stock = torch.zeros(len(SLOT_OF_ROW), RANK)
    torch_ops.bgmv_shrink(inputs, lora_a, stock, SLOT_OF_ROW, SCALE)
    with_adapter = SLOT_OF_ROW >= 0
    assert torch.equal(shrunk[with_adapter], stock[with_adapter])  # unchanged, bit for bit
    assert not shrunk[~with_adapter].any()

    before = torch.randn(len(SLOT_OF_ROW), OUT + 8, generator=torch.Generator().manual_seed(9))
    expanded = before.clone()
    kernels["bgmv_expand"](shrunk, lora_b, expanded, SLOT_OF_ROW, add_inputs)
    delta = reference_delta(inputs, lora_a, lora_b)
    base_part = before[:, :OUT] if add_inputs else torch.zeros_like(delta)
    want = torch.where(with_adapter.unsqueeze(-1), base_part + delta, before[:, :OUT])
    assert torch.allclose(expanded[:, :OUT], want, atol=1e-5)
    assert torch.equal(expanded[:, OUT:], before[:, OUT:])

    sliced = before.clone()
    kernels["bgmv_expand_slice"](shrunk, lora_b, sliced, SLOT_OF_ROW, 4, OUT, add_inputs)
    base_part = before[:, 4:4 + OUT] if add_inputs else torch.zeros_like(delta)
    want = torch.where(with_adapter.unsqueeze(-1), base_part + delta, before[:, 4:4 + OUT])
    assert torch.allclose(sliced[:, 4:4 + OUT], want, atol=1e-5)
    assert torch.equal(sliced[:, :4], before[:, :4])


def mixed_batch_output(wrapper: PunicaWrapperCPU, x: torch.Tensor,
                       weights: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """One linear layer's LoRA output for the batch, as vLLM's CPU runner computes it (the
    V1 runner always uses the prefill path; adapter ids 11 and 12 sit in slots 0 and 1)."""
    ids = {-1: 0, 0: 11, 1: 12}
    mapping = tuple(ids[slot] for slot in SLOT_OF_ROW.tolist())
    wrapper.update_metadata(LoRAMapping(mapping, mapping, is_prefill=True), [11, 12], SLOTS,
                            vocab_size=32)
    y = torch.zeros(len(SLOT_OF_ROW), OUT)
    wrapper.add_lora_linear(y, x, (weights[0],), (weights[1],), SCALE, (OUT,))
    return y


def test_the_cpu_wrapper_with_the_correction_installed(
        weights: tuple[torch.Tensor, torch.Tensor], inputs: torch.Tensor,
        monkeypatch: pytest.MonkeyPatch) -> None:
    wrapper = PunicaWrapperCPU(max_num_batched_tokens=16, max_batches=8, device="cpu")
    want = reference_delta(inputs, *weights)
    stock = mixed_batch_output(wrapper, inputs, weights)
    assert not torch.allclose(stock[1], want[1])  # today: the base row gets an adapter

    lora_rows.install(monkeypatch.setattr)
    corrected = mixed_batch_output(wrapper, inputs, weights)
    assert torch.allclose(corrected, want, atol=1e-5)
    assert torch.equal(corrected[SLOT_OF_ROW >= 0], stock[SLOT_OF_ROW >= 0])


def test_it_refuses_a_vllm_it_was_not_written_for(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    installed: list[str] = []
    monkeypatch.setattr(lora_rows, "install", lambda assign: installed.append("yes"))
    monkeypatch.setattr(vllm, "__version__", "0.33.0")
    with caplog.at_level(logging.WARNING, logger=lora_rows.__name__):
        lora_rows.register()
    assert installed == [] and "not applied" in caplog.text

    monkeypatch.setattr(vllm, "__version__", lora_rows.WRITTEN_FOR)
    monkeypatch.setenv(lora_rows.DISABLE_ENV, "off")  # the launcher's --no-plugins
    lora_rows.register()
    assert installed == []
    monkeypatch.delenv(lora_rows.DISABLE_ENV)
    lora_rows.register()
    assert installed == ["yes"]
