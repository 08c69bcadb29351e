"""The V1 Mirostat processor against an independent float64 llama.cpp-style reference."""

from __future__ import annotations

import math
import random
import zlib

import numpy as np
import pytest
import torch

from tests.unit.engine_plugins.mirostat_reference import (
    FakeBatch,
    make_processor,
    params,
    reference_step,
)

LN2 = math.log(2.0)
VOCAB = 49152


def seed_of(*parts: object) -> int:
    """A seed that is the same in every run (hash() of a string changes per process)."""
    return zlib.crc32(repr(parts).encode())


def logits_case(kind: str, rng: np.random.Generator, vocab: int = VOCAB) -> np.ndarray:
    if kind == "random":
        return rng.normal(0.0, 3.0, vocab)
    if kind == "flat":
        return np.zeros(vocab)
    if kind == "peaked":
        z = rng.normal(0.0, 1.0, vocab)
        z[rng.integers(vocab)] += 30.0
        return z
    if kind == "zipf":
        ranks = rng.permutation(vocab) + 1
        return -1.1 * np.log(ranks)
    if kind == "neg_inf":
        z = rng.normal(0.0, 2.0, vocab)
        z[rng.random(vocab) < 0.5] = -np.inf
        return z
    if kind == "ties":
        # Groups of equal logits: the threshold falls between groups, so a tied group must
        # be kept or dropped whole.
        z = np.repeat(np.array([5.0, 4.0, 3.0, 2.0]), 4)
        return np.concatenate([z, np.full(vocab - z.size, -5.0)])
    raise ValueError(kind)


KINDS = ["random", "flat", "peaked", "zipf", "neg_inf", "ties"]


def gumbel(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return -np.log(-np.log(rng.uniform(1e-12, 1.0, shape))).astype(np.float32)


def kept_set(row: torch.Tensor) -> set[int]:
    return set(torch.nonzero(torch.isfinite(row)).flatten().tolist())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tau", [1.0, 3.0, 6.0])
def test_one_step_matches_float64_reference(kind: str, tau: float) -> None:
    """Mixed batch: Mirostat rows (two temperatures), a row without Mirostat and a greedy
    row. Same noise in; same kept set, token, surprise and mu out."""
    rng = np.random.default_rng(seed_of(kind, tau))
    processor = make_processor()
    batch = FakeBatch(rows=[])
    batch.add("a", params(tau=tau, eta=0.1, temperature=1.0))
    batch.add("off", params(temperature=0.7))
    batch.add("b", params(tau=tau, eta=0.3, temperature=0.5))
    batch.add("greedy", params(tau=None, temperature=0.0))
    processor.update_state(batch.flush())

    raw = np.stack([logits_case(kind, rng) for _ in range(4)]).astype(np.float32)
    # vLLM divides by temperature before argmax-invariant processors.
    temps = np.array([1.0, 0.7, 0.5, 1.0], dtype=np.float32)[:, None]
    scaled = torch.from_numpy(raw / temps)
    noise = gumbel(rng, (2, VOCAB))
    processor.next_noise = torch.from_numpy(noise)
    before = scaled.clone()
    out = processor.apply(scaled)

    for k, (row, eta) in enumerate([(0, 0.1), (2, 0.3)]):
        ref = reference_step(before[row].numpy().astype(np.float64), 2 * tau, tau, eta,
                             noise[k].astype(np.float64))
        assert kept_set(out[row]) == {ref.token}  # the row is forced to the sample
        assert int(out[row].argmax()) == ref.token
        # The processor's own kept set, rebuilt from its threshold in float32.
        logq = torch.log_softmax(before[row], -1)
        mine = set(torch.nonzero((-logq / LN2) <= 2 * tau).flatten().tolist()) | \
            {int(before[row].argmax())}
        assert mine == ref.kept
        assert processor.surprise_pending[row].item() == pytest.approx(ref.surprise, abs=1e-4)
        assert processor.mu_pending[row].item() == pytest.approx(ref.mu_next, abs=1e-4)
    # Rows without Mirostat are untouched.
    assert torch.equal(out[1], before[1]) and torch.equal(out[3], before[3])


def run_sequence(tau: float, eta: float, steps: int, seed: int) -> tuple[list[float], list[float]]:
    """Drive one request for many steps, emitting what the processor sampled; returns the
    observed surprises and the mu trajectory (mu_0 .. mu_N), checked against the reference."""
    rng = np.random.default_rng(seed)
    processor = make_processor()
    batch = FakeBatch(rows=[])
    batch.add("r", params(tau=tau, eta=eta))
    processor.update_state(batch.flush())
    mu_ref = 2 * tau
    surprises, mus = [], [mu_ref]
    for step in range(steps):
        z = logits_case(KINDS[step % len(KINDS)], rng, vocab=4096).astype(np.float32)
        noise = gumbel(rng, (1, 4096))
        processor.next_noise = torch.from_numpy(noise)
        out = processor.apply(torch.from_numpy(z[None, :].copy()))
        ref = reference_step(z.astype(np.float64), mu_ref, tau, eta, noise[0])
        token = int(out[0].argmax())
        assert token == ref.token
        batch.outputs["r"].append(token)
        processor.update_state(batch.flush())
        surprises.append(processor.surprise_pending[0].item())
        mu_ref = ref.mu_next
        mus.append(mu_ref)
        assert processor.mu_pending[0].item() == pytest.approx(mu_ref, abs=1e-3)
    return surprises, mus


@pytest.mark.parametrize("tau,eta", [(2.0, 0.1), (3.0, 0.1), (5.0, 0.5)])
def test_controller_identity(tau: float, eta: float) -> None:
    """mean(surprise) - tau == (mu_0 - mu_N) / (eta * N), on every request."""
    for seed in range(3):
        surprises, mus = run_sequence(tau, eta, steps=60, seed=seed)
        n = len(surprises)
        assert np.mean(surprises) - tau == pytest.approx((mus[0] - mus[-1]) / (eta * n),
                                                         abs=1e-4)


def test_commit_only_when_the_sampled_token_is_emitted() -> None:
    """A discarded sample (chunked prefill: output does not grow) or an overridden one
    (another token emitted) leaves mu where it was."""
    processor = make_processor()
    batch = FakeBatch(rows=[])
    batch.add("r", params(tau=3.0, eta=0.5))
    processor.update_state(batch.flush())
    rng = np.random.default_rng(0)
    z = torch.from_numpy(rng.normal(0, 3, (1, 512)).astype(np.float32))
    processor.next_noise = torch.from_numpy(gumbel(rng, (1, 512)))
    x = int(processor.apply(z.clone())[0].argmax())
    processor.apply(z.clone())  # discarded: nothing appended
    assert processor.mu[0].item() == pytest.approx(6.0)
    batch.outputs["r"].append((x + 1) % 512)  # something else was emitted
    processor.apply(z.clone())
    assert processor.mu[0].item() == pytest.approx(6.0)
    x = int(processor.apply(z.clone())[0].argmax())  # pending at position 1 now
    expected = processor.mu_pending[0].item()
    batch.outputs["r"].append(x)
    processor.apply(z.clone())
    assert processor.mu[0].item() == pytest.approx(expected) and expected != 6.0


def test_persistent_batch_fuzz_matches_dict_keyed_reference() -> None:
    """Random adds, removes, swaps and condensing moves; discarded and overridden samples.
    Every request's tokens and mu equal a reference keyed by request, not by row."""
    vocab = 256
    rnd = random.Random(1234)
    processor = make_processor(max_rows=12)
    batch = FakeBatch(rows=[])
    ref_mu: dict[str, float] = {}
    config: dict[str, tuple[float, float]] = {}
    pending: dict[str, tuple[int, float]] = {}  # request -> (sampled token, mu if emitted)
    counter = 0
    checked = 0
    for step in range(400):
        # vLLM's order within a step: removals, additions, then moves.
        live = [i for i, r in enumerate(batch.rows) if r is not None]
        for index in rnd.sample(live, k=min(len(live), rnd.choice([0, 0, 1, 2]))):
            request = batch.rows[index]
            assert request is not None
            batch.remove(index)
            ref_mu.pop(request, None)
        while sum(r is not None for r in batch.rows) < 12 and rnd.random() < 0.5:
            counter += 1
            request = f"q{counter}"
            if rnd.random() < 0.25:
                batch.add(request, params(temperature=1.0))  # no Mirostat
            else:
                tau, eta = rnd.uniform(1.0, 5.0), rnd.choice([0.1, 0.3, 1.0])
                config[request] = (tau, eta)
                ref_mu[request] = 2 * tau
                batch.add(request, params(tau=tau, eta=eta))
        if rnd.random() < 0.5:
            batch.condense()
        live = [i for i, r in enumerate(batch.rows) if r is not None]
        if len(live) >= 2 and rnd.random() < 0.5:
            a, b = rnd.sample(live, 2)
            batch.swap(a, b)
        processor.update_state(batch.flush())
        if not batch.rows:
            continue
        # Logits and noise depend on (request, output position) only, never on the row.
        rows = [r for r in batch.rows]
        logits = torch.full((len(rows), vocab), 0.0)
        for i, request in enumerate(rows):
            if request is not None:
                g = np.random.default_rng(seed_of(request, len(batch.outputs[request])))
                logits[i] = torch.from_numpy(g.normal(0, 3, vocab).astype(np.float32))
        active_rows = [i for i, r in enumerate(rows) if r in ref_mu]
        noise = np.stack([np.random.default_rng(
            seed_of("n", rows[i], len(batch.outputs[rows[i]]))).gumbel(size=vocab)
            for i in active_rows]).astype(np.float32) if active_rows else np.zeros((0, vocab))
        processor.next_noise = torch.from_numpy(noise)
        before = logits.clone()
        out = processor.apply(logits)
        for k, i in enumerate(active_rows):
            request = rows[i]
            assert request is not None
            tau, eta = config[request]
            # Commit of the previous step, as the reference sees it.
            ref = reference_step(before[i].numpy().astype(np.float64), ref_mu[request],
                                 tau, eta, noise[k].astype(np.float64))
            assert int(out[i].argmax()) == ref.token, (step, request)
            assert processor.mu_pending[i].item() == pytest.approx(ref.mu_next, abs=1e-3)
            pending[request] = (ref.token, ref.mu_next)
            checked += 1
        # Emit: mostly the sample; sometimes discarded or overridden.
        for i, request in enumerate(rows):
            if request is None:
                continue
            fate = rnd.random()
            if request in ref_mu and fate < 0.1:
                continue  # discarded (partial prefill): no token appended
            emitted = int(out[i].argmax())
            if request in ref_mu and fate < 0.2:
                emitted = (emitted + 1) % vocab  # overridden by a later stage
            batch.outputs[request].append(emitted)
            if request in ref_mu and emitted == pending[request][0]:
                ref_mu[request] = pending[request][1]
    assert checked > 500
