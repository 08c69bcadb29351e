"""The Model Runner V2 processors on CPU with fake request state (no GPU here)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from vllm._custom_ops import apply_repetition_penalties_torch
from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsContext

from engine_plugins.mrv2 import MirostatMRV2, RepetitionPenaltyMRV2
from engine_plugins.plugins import Mirostat, RepetitionPenalty
from tests.unit.engine_plugins.mirostat_reference import params, reference_step

SLOTS, VOCAB, MAX_LEN = 6, 300, 64


def request_state() -> SimpleNamespace:
    return SimpleNamespace(
        device=torch.device("cpu"), max_num_reqs=SLOTS, vocab_size=VOCAB,
        all_token_ids=SimpleNamespace(gpu=torch.zeros((SLOTS, MAX_LEN), dtype=torch.int64)),
        prefill_len=SimpleNamespace(gpu=torch.zeros(SLOTS, dtype=torch.int64)),
        prompt_len=SimpleNamespace(gpu=torch.zeros(SLOTS, dtype=torch.int64)),
    )


def context(slots: list[int], pos: list[int], input_ids: list[int]) -> LogitsContext:
    mapping = torch.tensor(slots, dtype=torch.int64)
    return LogitsContext(
        expanded_idx_mapping=mapping, idx_mapping=mapping, idx_mapping_np=np.array(slots),
        expanded_local_pos=torch.zeros(len(slots), dtype=torch.int64),
        input_ids=torch.tensor(input_ids, dtype=torch.int64),
        pos=torch.tensor(pos, dtype=torch.int64),
        seq_lens_upper_bound_np=np.array(pos) + 1,
    )


class InjectedMirostatMRV2(MirostatMRV2):
    next_noise: torch.Tensor

    def noise(self, ctx: LogitsContext, vocab: int) -> torch.Tensor:
        return self.next_noise


def test_facades_build_the_runner_specific_implementation() -> None:
    config = SimpleNamespace(speculative_config=None)
    assert isinstance(Mirostat(config, request_state()), MirostatMRV2)
    assert isinstance(RepetitionPenalty(config, request_state()), RepetitionPenaltyMRV2)
    with pytest.raises(ValueError, match="speculative"):
        MirostatMRV2(SimpleNamespace(speculative_config=object()), request_state())  # type: ignore[arg-type]


def test_mirostat_follows_slots_and_skips_partial_prefill() -> None:
    """Two Mirostat requests and one plain one; rows reorder every step, one step is a
    partial prefill. Tokens and mu match the float64 reference per request."""
    rs = request_state()
    processor = InjectedMirostatMRV2(SimpleNamespace(speculative_config=None), rs)  # type: ignore[arg-type]
    config = {1: (2.0, 0.2, 0.8), 4: (4.0, 0.1, 1.0)}  # slot -> tau, eta, temperature
    for slot, (tau, eta, temp) in config.items():
        assert processor.add_request(slot, params(tau=tau, eta=eta, temperature=temp))
    assert not processor.add_request(2, params(temperature=1.0))
    processor.apply_staged_writes()
    prompt = 5
    rs.prefill_len.gpu[[1, 2, 4]] = prompt
    mu = {slot: 2 * cfg[0] for slot, cfg in config.items()}
    last = {1: 7, 2: 7, 4: 7}  # token fed at the current position
    pos = {1: prompt - 3, 2: prompt - 1, 4: prompt - 1}  # slot 1 is still prefilling
    rng = np.random.default_rng(3)
    for step in range(30):
        order = [1, 2, 4]
        rng.shuffle(order)
        z = torch.from_numpy(rng.normal(0, 3, (3, VOCAB)).astype(np.float32))
        noise = rng.gumbel(size=(3, VOCAB)).astype(np.float32)
        processor.next_noise = torch.from_numpy(noise)
        ctx = context(order, [pos[s] for s in order], [last[s] for s in order])
        out = processor.apply(z.clone(), ctx)
        for row, slot in enumerate(order):
            emits = pos[slot] + 1 >= prompt
            if slot not in config or not emits:
                assert torch.equal(out[row], z[row]), (step, slot)
            else:
                tau, eta, temp = config[slot]
                ref = reference_step(z[row].numpy().astype(np.float64) / temp, mu[slot],
                                     tau, eta, noise[row].astype(np.float64))
                assert int(out[row].argmax()) == ref.token
                assert torch.isinf(out[row]).sum() == VOCAB - 1
                assert processor.mu_pending[slot].item() == pytest.approx(ref.mu_next, abs=1e-4)
                mu[slot] = ref.mu_next
                last[slot] = ref.token
            if slot not in config:
                last[slot] = int(out[row].argmax())
            pos[slot] += 1


def test_repetition_penalty_matches_native_torch_path() -> None:
    rs = request_state()
    processor = RepetitionPenaltyMRV2(SimpleNamespace(), rs)  # type: ignore[arg-type]
    processor.add_request(0, penalty_params(1.3))
    processor.add_request(3, penalty_params(0.8))
    processor.add_request(5, penalty_params(None))
    processor.apply_staged_writes()
    rng = np.random.default_rng(0)
    history = {s: rng.integers(0, VOCAB, size=20) for s in (0, 3, 5)}
    for s, tokens in history.items():
        rs.all_token_ids.gpu[s, :20] = torch.from_numpy(tokens)
    order, pos = [5, 0, 3], [19, 19, 15]  # slot 3 has fed only 16 tokens so far
    logits = torch.from_numpy(rng.normal(0, 3, (3, VOCAB)).astype(np.float32))
    ctx = context(order, pos, [int(history[s][p]) for s, p in zip(order, pos, strict=True)])
    out = processor.apply(logits.clone(), ctx)
    expected = logits.clone()
    mask = torch.zeros((3, VOCAB), dtype=torch.bool)
    for row, (s, p) in enumerate(zip(order, pos, strict=True)):
        mask[row, torch.from_numpy(history[s][:p + 1])] = True
    apply_repetition_penalties_torch(expected, mask, mask, torch.tensor([1.0, 1.3, 0.8]))
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(out[0], logits[0])


def penalty_params(penalty: float | None):  # type: ignore[no-untyped-def]
    from vllm import SamplingParams

    return SamplingParams(extra_args=None if penalty is None
                          else {"repetition_penalty": penalty})


def test_a_second_registration_in_one_engine_is_inert() -> None:
    """vLLM constructs entry-point and command-line processors alike; the same class
    registered both ways must act once."""
    config = SimpleNamespace(speculative_config=None,
                             scheduler_config=SimpleNamespace(max_num_seqs=4))
    first = Mirostat(config, torch.device("cpu"), False)
    second = Mirostat(config, torch.device("cpu"), False)
    assert first.is_argmax_invariant() and second.is_argmax_invariant()
    logits = torch.randn(1, 8)
    assert type(first).__name__ == "Mirostat" and second.apply(logits) is logits
    other_engine = SimpleNamespace(speculative_config=None)
    assert isinstance(RepetitionPenalty(other_engine, request_state()), RepetitionPenaltyMRV2)
    assert not RepetitionPenalty(other_engine, request_state()).add_request(
        0, penalty_params(1.3))
