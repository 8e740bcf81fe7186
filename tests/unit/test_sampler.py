"""Unit tests of the engine's Sampler against hand-computed distributions, and of SamplingParams.validate."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import pytest
import torch

from rwkv_gateway.domain.types import SamplingParams
from rwkv_gateway.engine.sampler import Sampler
from rwkv_gateway.errors import GenerationFailed, InvalidParameter

NEG_INF = float("-inf")
POS_INF = float("inf")


def logits_of(probs: list[float]) -> torch.Tensor:
    """Logits whose softmax is `probs` (0 -> -inf)."""
    return torch.tensor([math.log(p) if p > 0 else NEG_INF for p in probs], dtype=torch.float32)


def softmax(values: list[float]) -> list[float]:
    m = max(values)
    exps = [math.exp(v - m) if v != NEG_INF else 0.0 for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def assert_dist(actual: torch.Tensor, expected: list[float], tol: float = 1e-5) -> None:
    assert actual.dtype == torch.float32
    assert actual.shape == (len(expected),)
    assert float(actual.sum()) == pytest.approx(1.0, abs=1e-5)
    assert actual.tolist() == pytest.approx(expected, abs=tol)


def make(vocab: int, prompt_tokens: tuple[int, ...] = (), **knobs: Any) -> Sampler:
    knobs.setdefault("seed", 1234)
    return Sampler(SamplingParams(**knobs), vocab, prompt_tokens=prompt_tokens)


P4 = [0.1, 0.2, 0.3, 0.4]


# -- temperature and greedy ----------------------------------------------------------------------------


def test_temperature_one_is_plain_softmax() -> None:
    assert_dist(make(4).probabilities(logits_of(P4)), P4)


def test_temperature_scales_logits() -> None:
    # logits [0, 2, 4] at T=2 are softmax([0, 1, 2]) = e^k / (1 + e + e^2).
    z = 1 + math.e + math.e**2
    expected = [1 / z, math.e / z, math.e**2 / z]
    assert_dist(make(3, temperature=2.0).probabilities(torch.tensor([0.0, 2.0, 4.0])), expected)


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_greedy_is_one_hot_argmax(temperature: float) -> None:
    sampler = make(4, temperature=temperature)
    logits = torch.tensor([0.5, 3.0, -1.0, 2.0])
    assert_dist(sampler.probabilities(logits), [0.0, 1.0, 0.0, 0.0])
    assert [sampler.sample(logits) for _ in range(5)] == [1] * 5


def test_greedy_tie_goes_to_lowest_id() -> None:
    sampler = make(5, temperature=0.0)
    logits = torch.tensor([1.0, 3.0, 2.0, 3.0, 3.0])
    assert sampler.sample(logits) == 1
    assert_dist(sampler.probabilities(logits), [0.0, 1.0, 0.0, 0.0, 0.0])


def test_caller_logits_are_not_modified() -> None:
    sampler = make(
        4,
        logit_bias={0: 5.0},
        banned_tokens=frozenset({1}),
        presence_penalty=1.0,
        repetition_penalty=2.0,
        top_p=0.5,
    )
    sampler.accept(2)
    logits = torch.tensor([0.5, 1.0, 2.0, -1.0])
    before = logits.clone()
    sampler.probabilities(logits)
    sampler.sample(logits)
    assert torch.equal(logits, before)


def test_half_precision_logits_are_accepted() -> None:
    for dtype in (torch.float16, torch.bfloat16):
        probs = make(3).probabilities(torch.tensor([0.0, 0.0, 0.0], dtype=dtype))
        assert_dist(probs, [1 / 3] * 3)


# -- top-p ---------------------------------------------------------------------------------------------


def test_top_p_one_disables() -> None:
    assert_dist(make(4, top_p=1.0).probabilities(logits_of(P4)), P4)


def test_top_p_zero_keeps_only_the_top_token() -> None:
    sampler = make(4, top_p=0.0)
    assert_dist(sampler.probabilities(logits_of(P4)), [0.0, 0.0, 0.0, 1.0])
    assert {sampler.sample(logits_of(P4)) for _ in range(50)} == {3}


def test_top_p_middle_value() -> None:
    # Sorted: 0.4, 0.3 (cum 0.7 >= 0.65) -> keep {3, 2}, renormalised to 4/7, 3/7.
    assert_dist(make(4, top_p=0.65).probabilities(logits_of(P4)), [0.0, 0.0, 3 / 7, 4 / 7])
    # cum 0.7 < 0.75, 0.9 >= 0.75 -> keep three.
    assert_dist(make(4, top_p=0.75).probabilities(logits_of(P4)), [0.0, 2 / 9, 3 / 9, 4 / 9])


def _reference_nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Plain full-sort nucleus, in float64, for comparison with the sampler's incremental top-k search."""
    p = probs.double()
    vals, ids = torch.sort(p, descending=True)
    cum = torch.cumsum(vals, 0)
    n = int((cum < top_p * float(cum[-1])).sum()) + 1
    out = torch.zeros_like(p)
    out[ids[:n]] = vals[:n]
    return (out / out.sum()).float()


@pytest.mark.parametrize("scale", [0.05, 1.0, 6.0])  # nearly flat (nucleus spans most of V) .. peaked
@pytest.mark.parametrize("top_p", [0.3, 0.9, 0.999])
def test_top_p_matches_full_sort_reference(scale: float, top_p: float) -> None:
    vocab = 5000
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(vocab, generator=gen) * scale
    sampler = make(vocab, top_p=top_p)
    expected = _reference_nucleus(torch.softmax(logits, 0), top_p)
    got = sampler.probabilities(logits)
    assert torch.equal(got > 0, expected > 0)
    assert torch.allclose(got, expected, atol=1e-6)


def _exact_nucleus(probs: torch.Tensor, top_p: float, min_p: float = 0.0) -> torch.Tensor:
    """The definition, by a full stable sort: the smallest set of most probable tokens (ties toward
    lower ids) holding `top_p` of the mass, then min-p against the top probability; renormalised."""
    vals, ids = torch.sort(probs, descending=True, stable=True)
    cum = torch.cumsum(vals, 0, dtype=torch.float64)
    n = min(int((cum < top_p * float(cum[-1])).sum()) + 1, vals.shape[0])
    if min_p > 0.0:
        n = min(n, int((vals >= min_p * vals[0]).sum()))
    out = torch.zeros(probs.shape[0], dtype=torch.float64)
    out[ids[:n]] = vals[:n].double()
    return out / out.sum()


def _nucleus_logits(kind: str, vocab: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "flat":  # random-weight model / high temperature: the nucleus spans thousands of tokens
        return torch.randn(vocab, generator=gen) * 2.4
    if kind == "very-flat":
        return torch.randn(vocab, generator=gen)
    if kind == "peaked":
        return torch.randn(vocab, generator=gen) * 8.0
    if kind == "near-uniform":  # all probabilities within a fraction of a percent of each other
        return torch.randn(vocab, generator=gen) * 0.003
    if kind == "uniform":
        return torch.zeros(vocab)
    if kind == "few-values":  # a handful of distinct probabilities, each shared by many tokens
        scale = 0.5 + 2.5 * float(torch.rand((), generator=gen))
        return torch.randint(0, 6, (vocab,), generator=gen).float() * scale
    if kind == "tied-top":  # a few tokens tie for a large share; the cut falls among them
        logits = torch.randn(vocab, generator=gen)
        logits[torch.randperm(vocab, generator=gen)[:10]] = 10.0 if vocab > 1000 else 3.0
        return logits
    if kind == "mostly-banned":
        logits = torch.randn(vocab, generator=gen) * 2.0
        logits[torch.rand(vocab, generator=gen) < 0.8] = NEG_INF
        logits[vocab // 2] = 0.0
        return logits
    raise AssertionError(kind)


NUCLEUS_KINDS = [
    "flat",
    "very-flat",
    "peaked",
    "near-uniform",
    "uniform",
    "few-values",
    "tied-top",
    "mostly-banned",
]


def _assert_same_filtered(got: torch.Tensor, expected: torch.Tensor) -> None:
    assert torch.equal(got > 0, expected > 0)
    assert torch.allclose(got.double(), expected, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("vocab", [65536, 3000, 50])
@pytest.mark.parametrize("kind", NUCLEUS_KINDS)
def test_top_p_is_exact_on_many_distributions(kind: str, vocab: int) -> None:
    gen = torch.Generator().manual_seed(vocab + len(kind))
    for seed in range(3):
        logits = _nucleus_logits(kind, vocab, gen)
        probs = torch.softmax(logits, 0)
        for top_p in (0.0, 1e-9, 0.3, 0.5, 0.9, 0.99, 0.999999):
            got = make(vocab, top_p=top_p, seed=seed).probabilities(logits)
            _assert_same_filtered(got, _exact_nucleus(probs, top_p))


@pytest.mark.parametrize("vocab", [65536, 3000])
@pytest.mark.parametrize("kind", NUCLEUS_KINDS)
def test_top_p_then_min_p_is_exact(kind: str, vocab: int) -> None:
    gen = torch.Generator().manual_seed(vocab * 3 + len(kind))
    logits = _nucleus_logits(kind, vocab, gen)
    probs = torch.softmax(logits, 0)
    for top_p in (0.5, 0.9, 0.99):
        # Tiny min-p removes nothing from the nucleus; larger ones cut inside it.
        for min_p in (1e-6, 0.01, 0.05, 0.3):
            got = make(vocab, top_p=top_p, min_p=min_p).probabilities(logits)
            _assert_same_filtered(got, _exact_nucleus(probs, top_p, min_p))


@pytest.mark.parametrize("kind", ["flat", "very-flat", "peaked"])
def test_top_k_then_top_p_is_exact(kind: str) -> None:
    vocab = 65536
    gen = torch.Generator().manual_seed(5)
    logits = _nucleus_logits(kind, vocab, gen)
    for top_k in (40, 1000):
        ids = torch.topk(torch.softmax(logits, 0), top_k).indices  # no ties in these distributions
        kept = torch.full((vocab,), NEG_INF)
        kept[ids] = logits[ids]
        for top_p in (0.5, 0.9):
            got = make(vocab, top_k=top_k, top_p=top_p).probabilities(logits)
            _assert_same_filtered(got, _exact_nucleus(torch.softmax(kept, 0), top_p))


def test_top_p_ties_at_the_cut_go_to_lower_ids() -> None:
    # 40 equal tokens at scattered ids (the rest impossible): top_p 0.5 keeps the 20 lowest ids.
    vocab = 65536
    ids = torch.randperm(vocab, generator=torch.Generator().manual_seed(9))[:40]
    logits = torch.full((vocab,), NEG_INF)
    logits[ids] = 0.0
    sampler = make(vocab, top_p=0.5, seed=3)
    probs = sampler.probabilities(logits)
    lowest = sorted(ids.tolist())[:20]
    assert torch.nonzero(probs).flatten().tolist() == lowest
    assert probs[lowest].tolist() == pytest.approx([1 / 20] * 20)
    draws = 2000
    counts = Counter(sampler.sample(logits) for _ in range(draws))
    assert set(counts) == set(lowest)
    for token in lowest:
        assert counts[token] / draws == pytest.approx(1 / 20, abs=0.02)


def test_top_p_boundary_among_tokens_below_float64_resolution() -> None:
    # One token holds all but ~1e-13 of the mass; the cut falls in a tail of ~1e-18 tokens, each too
    # small to change a float64 running total that is near 1. It must still give a valid nucleus.
    vocab = 65536
    logits = -41.4 + torch.randn(vocab, generator=torch.Generator().manual_seed(2)) * 3e-3
    logits[0] = 0.0
    for top_p in (0.9999999999999, 0.999999999999999):
        sampler = make(vocab, top_p=top_p)
        probs = sampler.probabilities(logits)
        assert probs[0] > 0.99
        assert float(probs.sum()) == pytest.approx(1.0)
        assert sampler.sample(logits) in set(torch.nonzero(probs).flatten().tolist())


@pytest.mark.parametrize("kind", ["flat", "near-uniform", "few-values", "peaked"])
def test_large_vocab_top_p_draws_stay_in_the_nucleus_and_reproduce(kind: str) -> None:
    vocab = 65536
    logits = _nucleus_logits(kind, vocab, torch.Generator().manual_seed(21))
    first, second = make(vocab, top_p=0.9, seed=4), make(vocab, top_p=0.9, seed=4)
    allowed = first.probabilities(logits) > 0
    tokens = [first.sample(logits) for _ in range(30)]
    assert all(allowed[t] for t in tokens)
    assert tokens == [second.sample(logits) for _ in range(30)]


# -- top-k ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("top_k", [0, 4, 100])
def test_top_k_zero_or_at_least_vocab_disables(top_k: int) -> None:
    assert_dist(make(4, top_k=top_k).probabilities(logits_of(P4)), P4)


def test_top_k_keeps_k_most_probable() -> None:
    assert_dist(make(4, top_k=2).probabilities(logits_of(P4)), [0.0, 0.0, 3 / 7, 4 / 7])
    assert_dist(make(4, top_k=1).probabilities(logits_of(P4)), [0.0, 0.0, 0.0, 1.0])


def test_top_p_measures_mass_after_top_k_renormalisation() -> None:
    # top_k=3 leaves 2/9, 3/9, 4/9; cumulative 4/9, 7/9 >= 0.75 -> two tokens. (Measured on the
    # original distribution, 0.7 < 0.75 would have kept three.)
    sampler = make(4, top_k=3, top_p=0.75)
    assert_dist(sampler.probabilities(logits_of(P4)), [0.0, 0.0, 3 / 7, 4 / 7])


# -- min-p ---------------------------------------------------------------------------------------------


def test_min_p() -> None:
    # max p 0.4: min_p 0.6 -> threshold 0.24 keeps 0.3 and 0.4; min_p 0.4 -> 0.16 keeps three.
    assert_dist(make(4, min_p=0.6).probabilities(logits_of(P4)), [0.0, 0.0, 3 / 7, 4 / 7])
    assert_dist(make(4, min_p=0.4).probabilities(logits_of(P4)), [0.0, 2 / 9, 3 / 9, 4 / 9])
    assert_dist(make(4, min_p=0.0).probabilities(logits_of(P4)), P4)
    assert_dist(make(4, min_p=1.0).probabilities(logits_of(P4)), [0.0, 0.0, 0.0, 1.0])


def test_min_p_after_top_k() -> None:
    assert_dist(make(4, top_k=3, min_p=0.6).probabilities(logits_of(P4)), [0.0, 0.0, 3 / 7, 4 / 7])
    assert_dist(make(4, top_p=0.95, min_p=0.6).probabilities(logits_of(P4)), [0.0, 0.0, 3 / 7, 4 / 7])


# -- logit bias and bans -------------------------------------------------------------------------------


def test_logit_bias_adds_to_logits() -> None:
    sampler = make(4, logit_bias={2: math.log(3.0), 0: -math.log(2.0)})
    # weights 1/2, 1, 3, 1 -> total 5.5
    assert_dist(sampler.probabilities(torch.zeros(4)), [0.5 / 5.5, 1 / 5.5, 3 / 5.5, 1 / 5.5])


def test_banned_tokens_are_never_sampled() -> None:
    sampler = make(4, banned_tokens=frozenset({0, 3}), logit_bias={3: 50.0})
    logits = torch.zeros(4)
    assert_dist(sampler.probabilities(logits), [0.0, 0.5, 0.5, 0.0])
    drawn = Counter(sampler.sample(logits) for _ in range(3000))
    assert set(drawn) == {1, 2}


def test_banned_top_token_under_greedy() -> None:
    sampler = make(3, temperature=0.0, banned_tokens=frozenset({1}))
    assert sampler.sample(torch.tensor([0.0, 5.0, 1.0])) == 2


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_everything_banned_fails(temperature: float) -> None:
    sampler = make(3, temperature=temperature, banned_tokens=frozenset({0, 1, 2}))
    with pytest.raises(GenerationFailed):
        sampler.sample(torch.zeros(3))
    with pytest.raises(GenerationFailed):
        sampler.probabilities(torch.zeros(3))


# -- presence / frequency penalties --------------------------------------------------------------------


def test_presence_frequency_penalties_with_decay() -> None:
    sampler = make(5, presence_penalty=0.5, frequency_penalty=0.25, penalty_decay=0.5)
    sampler.accept(1)
    assert sampler.occurrence == {1: 1.0}
    sampler.accept(1)  # decay to 0.5, then +1
    assert sampler.occurrence == {1: 1.5}
    sampler.accept(2)  # token 1 decays to 0.75; token 2 starts at 1
    assert sampler.occurrence == pytest.approx({1: 0.75, 2: 1.0})
    # logit[t] -= 0.5 + occurrence[t] * 0.25: token 1 -> -0.6875, token 2 -> -0.75.
    expected = softmax([0.0, -0.6875, -0.75, 0.0, 0.0])
    assert_dist(sampler.probabilities(torch.zeros(5)), expected)
    sampler.accept(4)  # 1 -> 0.375, 2 -> 0.5, 4 -> 1
    expected = softmax([0.0, -(0.5 + 0.375 * 0.25), -(0.5 + 0.5 * 0.25), 0.0, -(0.5 + 0.25)])
    assert_dist(sampler.probabilities(torch.zeros(5)), expected)


def test_presence_penalty_without_decay_counts_up() -> None:
    sampler = make(3, presence_penalty=1.0, frequency_penalty=0.5)
    for _ in range(3):
        sampler.accept(0)
    assert sampler.occurrence == {0: 3.0}
    assert_dist(sampler.probabilities(torch.zeros(3)), softmax([-(1.0 + 1.5), 0.0, 0.0]))


def test_zero_decay_keeps_presence_only_for_old_tokens() -> None:
    sampler = make(3, presence_penalty=1.0, frequency_penalty=2.0, penalty_decay=0.0)
    sampler.accept(0)
    sampler.accept(1)  # token 0's count decays to 0 but it stays "present"
    assert_dist(sampler.probabilities(torch.zeros(3)), softmax([-1.0, -3.0, 0.0]))


def test_sample_records_its_own_token() -> None:
    sampler = make(3, temperature=0.0, presence_penalty=10.0)
    logits = torch.tensor([0.0, 2.0, 1.0])
    # 1 wins, is penalised to -8; then 2 wins and is penalised; then 0.
    assert [sampler.sample(logits) for _ in range(3)] == [1, 2, 0]


def test_penalties_ignore_prompt_tokens() -> None:
    sampler = make(3, prompt_tokens=(0, 1), presence_penalty=1.0, repetition_penalty=2.0)
    assert_dist(sampler.probabilities(torch.zeros(3)), [1 / 3] * 3)
    assert sampler.occurrence == {}


# -- repetition penalty --------------------------------------------------------------------------------


def test_repetition_penalty_divides_positive_and_multiplies_negative() -> None:
    sampler = make(4, repetition_penalty=2.0)
    sampler.accept(0)
    sampler.accept(1)
    sampler.accept(0)  # repeats count once
    logits = torch.tensor([2.0, -1.0, 1.0, 0.5])
    assert_dist(sampler.probabilities(logits), softmax([1.0, -2.0, 1.0, 0.5]))


def test_repetition_penalty_one_disables() -> None:
    sampler = make(3, repetition_penalty=1.0)
    sampler.accept(0)
    logits = torch.tensor([2.0, 0.0, 0.0])
    assert_dist(sampler.probabilities(logits), softmax([2.0, 0.0, 0.0]))


def test_repetition_penalty_on_prompt_when_asked() -> None:
    logits = torch.tensor([2.0, -1.0, 1.0, 0.0])
    on = make(4, prompt_tokens=(1, 2), repetition_penalty=4.0, penalize_prompt=True)
    assert_dist(on.probabilities(logits), softmax([2.0, -4.0, 0.25, 0.0]))
    off = make(4, prompt_tokens=(1, 2), repetition_penalty=4.0, penalize_prompt=False)
    assert_dist(off.probabilities(logits), softmax([2.0, -1.0, 1.0, 0.0]))


def test_presence_applies_before_repetition() -> None:
    sampler = make(2, presence_penalty=1.0, repetition_penalty=2.0)
    sampler.accept(0)
    # (3 - 1) / 2 = 1, not 3 / 2 - 1 = 0.5.
    assert_dist(sampler.probabilities(torch.tensor([3.0, 0.0])), softmax([1.0, 0.0]))


# -- Mirostat v2 ---------------------------------------------------------------------------------------

# Surprises (bits) of [0.5, 0.25, 0.125, 0.125] are 1, 2, 3, 3.
MIRO = [0.5, 0.25, 0.125, 0.125]


def test_mirostat_truncates_by_surprise_and_updates_mu() -> None:
    sampler = make(4, mirostat_tau=1.0, mirostat_eta=0.1)
    assert sampler.mu == pytest.approx(2.0)  # 2 * tau
    logits = logits_of(MIRO)
    # mu = 2 keeps surprises <= 2: tokens 0 and 1, renormalised to 2/3, 1/3.
    assert_dist(sampler.probabilities(logits), [2 / 3, 1 / 3, 0.0, 0.0])
    assert sampler.mu == pytest.approx(2.0)  # probabilities() changes nothing
    token = sampler.sample(logits)
    assert token in (0, 1)
    # Surprise is measured in the truncated distribution: -log2(2/3) or -log2(1/3).
    expected = {0: 2.0 - 0.1 * (math.log2(1.5) - 1.0), 1: 2.0 - 0.1 * (math.log2(3.0) - 1.0)}
    assert expected == pytest.approx({0: 2.0415037, 1: 1.9415037})
    assert sampler.mu == pytest.approx(expected[token])


def test_mirostat_mu_follows_every_draw() -> None:
    tau, eta = 1.5, 0.3
    sampler = make(4, mirostat_tau=tau, mirostat_eta=eta, seed=99)
    logits = logits_of(MIRO)
    mu = 2 * tau
    for _ in range(30):
        probs = sampler.probabilities(logits)
        kept = {i for i, p in enumerate(MIRO) if -math.log2(p) <= mu} or {0}
        assert {i for i, p in enumerate(probs.tolist()) if p > 0} == kept
        token = sampler.sample(logits)
        assert token in kept
        mu -= eta * (-math.log2(float(probs[token])) - tau)
        assert sampler.mu == pytest.approx(mu, abs=1e-5)


def test_mirostat_keeps_top_token_when_mu_is_tiny() -> None:
    sampler = make(4, mirostat_tau=0.1)  # mu 0.2 < surprise 1 of the best token
    assert_dist(sampler.probabilities(logits_of(MIRO)), [1.0, 0.0, 0.0, 0.0])
    assert sampler.sample(logits_of(MIRO)) == 0
    # surprise 0 in the one-token distribution: mu = 0.2 - 0.1 * (0 - 0.1)
    assert sampler.mu == pytest.approx(0.21)


def test_mirostat_replaces_top_k_top_p_min_p() -> None:
    sampler = make(4, mirostat_tau=1.0, top_k=1, top_p=0.1, min_p=0.9)
    assert_dist(sampler.probabilities(logits_of(MIRO)), [2 / 3, 1 / 3, 0.0, 0.0])


def test_mirostat_applies_after_temperature() -> None:
    # T=0.5 squares the probabilities: 0.25, 0.0625, 0.015625 x2 (sum 0.34375) -> surprise of the
    # second is log2(0.34375 / 0.0625) = 2.46 > mu 2, so only the top token stays.
    sampler = make(4, mirostat_tau=1.0, temperature=0.5)
    assert_dist(sampler.probabilities(logits_of(MIRO)), [1.0, 0.0, 0.0, 0.0])


def test_greedy_wins_over_mirostat() -> None:
    sampler = make(4, mirostat_tau=1.0, temperature=0.0)
    assert sampler.sample(logits_of([0.2, 0.5, 0.2, 0.1])) == 1
    assert sampler.mu == pytest.approx(2.0)


def test_forced_tokens_do_not_move_mu() -> None:
    sampler = make(4, mirostat_tau=1.0)
    sampler.accept(3)
    assert sampler.mu == pytest.approx(2.0)


# -- seeds and the draw --------------------------------------------------------------------------------


def _run(sampler: Sampler, logits: torch.Tensor, n: int = 50) -> list[int]:
    return [sampler.sample(logits) for _ in range(n)]


@pytest.mark.parametrize(
    "knobs",
    [{}, {"top_p": 0.9}, {"top_k": 20, "temperature": 0.7}, {"min_p": 0.5}, {"mirostat_tau": 5.0}],
)
def test_same_seed_same_tokens(knobs: dict[str, Any]) -> None:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(64, generator=gen)
    first = _run(make(64, seed=42, **knobs), logits)
    second = _run(make(64, seed=42, **knobs), logits)
    assert first == second


def test_different_seeds_differ_on_a_flat_distribution() -> None:
    logits = torch.zeros(64)
    runs = {tuple(_run(make(64, seed=seed), logits)) for seed in (1, 2, 3)}
    assert len(runs) == 3
    assert len(set(next(iter(runs)))) > 10  # and a run is not stuck on one token


def test_unseeded_samplers_differ() -> None:
    logits = torch.zeros(64)
    assert _run(make(64, seed=None), logits) != _run(make(64, seed=None), logits)


@pytest.mark.parametrize("seed", [0, -1, 2**63, 2**70])
def test_any_integer_seed_is_accepted(seed: int) -> None:
    assert _run(make(8, seed=seed), torch.zeros(8), 5) == _run(make(8, seed=seed), torch.zeros(8), 5)


def test_probabilities_does_not_consume_randomness() -> None:
    logits = torch.zeros(16)
    plain = make(16, seed=5)
    peeking = make(16, seed=5)
    tokens = []
    for _ in range(20):
        peeking.probabilities(logits)
        tokens.append(peeking.sample(logits))
    assert tokens == _run(plain, logits, 20)


@pytest.mark.parametrize(
    "knobs",
    [
        {"temperature": 0.8},
        {"top_k": 3, "temperature": 1.3},
        {"top_p": 0.8, "logit_bias": {0: 1.0}},
        {"mirostat_tau": 1.2},
        {"min_p": 0.3},
    ],
)
def test_sampling_frequencies_match_probabilities(knobs: dict[str, Any]) -> None:
    logits = logits_of(P4)
    sampler = make(4, seed=2024, **knobs)
    expected = sampler.probabilities(logits).tolist()
    draws = 20000
    if "mirostat_tau" in knobs:
        # mu moves with each draw; draw from fresh samplers so every draw uses the first distribution.
        counts = Counter(make(4, seed=s, **knobs).sample(logits) for s in range(draws // 4))
        draws //= 4
    else:
        counts = Counter(sampler.sample(logits) for _ in range(draws))
    for token, p in enumerate(expected):
        assert counts[token] / draws == pytest.approx(p, abs=0.02)
        if p == 0.0:
            assert counts[token] == 0


def test_large_vocab_draw_matches_probabilities() -> None:
    # Long vectors are drawn in two levels (block sums, then inside a block); 5003 is not a multiple
    # of the block; two live tokens share a block, one sits in the padded tail block.
    vocab = 5003
    live = {7: 0.2, 300: 0.1, 400: 0.2, 2600: 0.1, 5002: 0.4}
    logits = torch.full((vocab,), NEG_INF)
    for token, p in live.items():
        logits[token] = math.log(p)
    sampler = make(vocab, seed=77)
    probs = sampler.probabilities(logits)
    assert {i: round(float(probs[i]), 6) for i in torch.nonzero(probs).flatten().tolist()} == live
    draws = 8000
    counts = Counter(sampler.sample(logits) for _ in range(draws))
    assert set(counts) <= set(live)
    for token, p in live.items():
        assert counts[token] / draws == pytest.approx(p, abs=0.02)


def test_many_distinct_penalised_tokens() -> None:
    vocab = 1000
    sampler = make(
        vocab, presence_penalty=1.0, frequency_penalty=0.5, penalty_decay=0.9, repetition_penalty=2.0
    )
    history = [(i * 37) % vocab for i in range(300)] + [5, 5]
    for token in history:
        sampler.accept(token)
    expected_counts: dict[int, float] = {}
    for token in history:
        expected_counts = {t: c * 0.9 for t, c in expected_counts.items()}
        expected_counts[token] = expected_counts.get(token, 0.0) + 1.0
    assert sampler.occurrence == pytest.approx(expected_counts)
    logits = torch.linspace(-3.0, 3.0, vocab)
    expected = logits.double().clone()
    for t, c in expected_counts.items():
        expected[t] -= 1.0 + 0.5 * c
    for t in set(history):
        expected[t] = expected[t] / 2.0 if expected[t] > 0 else expected[t] * 2.0
    assert torch.allclose(sampler.probabilities(logits).double(), torch.softmax(expected, 0), atol=1e-6)


# -- non-finite logits and misuse ----------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_nan_logits_fail(temperature: float) -> None:
    sampler = make(4, temperature=temperature)
    logits = torch.tensor([0.0, float("nan"), 1.0, 2.0])
    with pytest.raises(GenerationFailed, match="NaN"):
        sampler.sample(logits)
    with pytest.raises(GenerationFailed, match="NaN"):
        sampler.probabilities(logits)


def test_infinite_logits_are_fine() -> None:
    sampler = make(4, top_p=0.9)
    logits = torch.tensor([0.0, POS_INF, NEG_INF, POS_INF])
    assert_dist(sampler.probabilities(logits), [0.0, 0.5, 0.0, 0.5])
    assert {sampler.sample(logits) for _ in range(100)} == {1, 3}
    assert make(4, temperature=0.0).sample(logits) == 1
    assert_dist(make(3).probabilities(torch.tensor([NEG_INF, 0.0, 0.0])), [0.0, 0.5, 0.5])


def test_wrong_shape_and_out_of_range_tokens_are_rejected() -> None:
    sampler = make(4)
    with pytest.raises(ValueError, match="shape"):
        sampler.sample(torch.zeros(5))
    with pytest.raises(ValueError, match="shape"):
        sampler.sample(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="vocabulary"):
        sampler.accept(4)
    with pytest.raises(ValueError, match="vocabulary"):
        make(4, prompt_tokens=(9,), penalize_prompt=True, repetition_penalty=1.5)


def test_sampler_validates_its_params() -> None:
    with pytest.raises(InvalidParameter):
        make(4, top_p=2.0)
    with pytest.raises(InvalidParameter) as info:
        make(4, banned_tokens=frozenset({4}))
    assert info.value.param == "banned_tokens"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_logits_match_cpu() -> None:
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(1000, generator=gen)
    knobs: dict[str, Any] = {
        "top_p": 0.9,
        "top_k": 200,
        "logit_bias": {3: 2.0},
        "banned_tokens": frozenset({5}),
        "presence_penalty": 0.3,
        "repetition_penalty": 1.3,
    }
    cpu, cuda = make(1000, seed=8, **knobs), make(1000, seed=8, **knobs)
    for _ in range(20):
        assert torch.allclose(cpu.probabilities(logits), cuda.probabilities(logits.cuda()).cpu(), atol=1e-6)
        assert cpu.sample(logits) == cuda.sample(logits.cuda())


# -- SamplingParams.validate ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("knobs", "param"),
    [
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": POS_INF}, "temperature"),
        ({"temperature": NEG_INF}, "temperature"),
        ({"top_p": -0.1}, "top_p"),
        ({"top_p": 1.1}, "top_p"),
        ({"top_p": float("nan")}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"min_p": -0.5}, "min_p"),
        ({"min_p": 1.5}, "min_p"),
        ({"mirostat_tau": 0.0}, "mirostat_tau"),
        ({"mirostat_tau": float("nan")}, "mirostat_tau"),
        ({"mirostat_tau": 5.0, "mirostat_eta": 0.0}, "mirostat_eta"),
        ({"presence_penalty": POS_INF}, "presence_penalty"),
        ({"frequency_penalty": float("nan")}, "frequency_penalty"),
        ({"penalty_decay": 1.5}, "penalty_decay"),
        ({"penalty_decay": -0.1}, "penalty_decay"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": -1.0}, "repetition_penalty"),
        ({"banned_tokens": frozenset({-1})}, "banned_tokens"),
        ({"banned_tokens": frozenset({8})}, "banned_tokens"),
        ({"logit_bias": {8: 1.0}}, "logit_bias"),
        ({"logit_bias": {1: float("nan")}}, "logit_bias"),
        ({"temperature": "1"}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_validate_rejects(knobs: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidParameter) as info:
        SamplingParams(**knobs).validate(vocab_size=8)
    assert info.value.param == param


@pytest.mark.parametrize(
    "knobs",
    [
        {},
        {"temperature": 0.0},
        {"temperature": -1.0},
        {"top_p": 0.0, "top_k": 0, "min_p": 1.0},
        {"mirostat_tau": 5.0, "mirostat_eta": 0.1},
        {"penalty_decay": 0.0, "presence_penalty": -1.0},
        {"banned_tokens": frozenset({0, 7}), "logit_bias": {7: -100.0}, "seed": -3},
    ],
)
def test_validate_accepts(knobs: dict[str, Any]) -> None:
    SamplingParams(**knobs).validate(vocab_size=8)


# -- the role-play sampler's knobs (docs/roleplay.md#13-sampling) --------------------------------------


def test_avoid_repeat_bans_the_token_just_consumed() -> None:
    logits = logits_of([0.4, 0.3, 0.2, 0.1])
    sampler = make(4, prompt_tokens=(7, 0), avoid_repeat_tokens=frozenset({0, 2}))
    assert_dist(sampler.probabilities(logits), [0.0, 0.5, 1 / 3, 1 / 6])  # the prompt ended in 0
    sampler.accept(1)  # not in the set: nothing banned
    assert_dist(sampler.probabilities(logits), [0.4, 0.3, 0.2, 0.1])
    sampler.accept(2)
    assert_dist(sampler.probabilities(logits), [0.5, 0.375, 0.0, 0.125])


def test_avoid_repeat_uses_the_preceding_token_for_an_empty_prompt() -> None:
    logits = logits_of([0.4, 0.3, 0.2, 0.1])
    sampler = make(4, avoid_repeat_tokens=frozenset({3}), preceding_token=3)
    assert_dist(sampler.probabilities(logits), [4 / 9, 3 / 9, 2 / 9, 0.0])
    assert make(4, avoid_repeat_tokens=frozenset({3})).probabilities(logits)[3] > 0


def test_temperature_last_reshapes_only_the_survivors() -> None:
    probs = [0.5, 0.3, 0.15, 0.05]
    logits = logits_of(probs)
    # min-p 0.2 on the temperature-1 distribution keeps p >= 0.1: tokens 0-2; then w = p ** (1 / 2).
    last = make(4, temperature=2.0, min_p=0.2, temperature_last=True)
    w = [math.sqrt(p) for p in probs[:3]]
    assert_dist(last.probabilities(logits), [x / sum(w) for x in w] + [0.0])
    # Temperature first flattens before min-p looks, and then every token passes.
    first = make(4, temperature=2.0, min_p=0.2)
    assert float(first.probabilities(logits)[3]) > 0


def test_rwkv_mirostat_keeps_min_p_and_learns_from_the_untruncated_probability() -> None:
    logits = logits_of([0.5, 0.3, 0.15, 0.05])
    # tau 1: mu 2 keeps p >= 0.25 (tokens 0, 1); min-p 0.7 then keeps p >= 0.35: token 0 alone.
    rwkv = make(4, mirostat_tau=1.0, mirostat_eta=0.5, min_p=0.7, mirostat_variant="rwkv")
    assert_dist(rwkv.probabilities(logits), [1.0, 0.0, 0.0, 0.0])
    assert rwkv.sample(logits) == 0
    assert rwkv.mu == pytest.approx(2.0 - 0.5 * (1.0 - 1.0))  # surprise of p = 0.5 is 1 bit
    llama = make(4, mirostat_tau=1.0, mirostat_eta=0.5, min_p=0.7)
    assert_dist(llama.probabilities(logits), [0.625, 0.375, 0.0, 0.0])


def test_role_play_sampler_as_the_spec_computes_it() -> None:
    """Section 6.2 steps 1-8 with T 2, tau 3 (mu 6 keeps p >= 1/64), min-p 0.05, presence 0.2, token 5
    (punctuation) just consumed and token 0 (end of text) banned."""
    raw = [3.0, 2.0, 1.0, 0.5, -1.0, 4.0]
    logits = torch.tensor(raw)
    sampler = make(
        6,
        prompt_tokens=(1, 5),
        seed=3,
        temperature=2.0,
        temperature_last=True,
        mirostat_tau=3.0,
        mirostat_eta=0.1,
        mirostat_variant="rwkv",
        min_p=0.05,
        repetition_penalty=1.2,
        avoid_repeat_tokens=frozenset({5}),
        banned_tokens=frozenset({0}),
    )

    def expected(z: list[float], mu: float) -> list[float]:
        p = softmax(z)
        kept = [pi if pi >= 2.0**-mu and pi >= 0.05 * max(p) else 0.0 for pi in p]
        w = [math.sqrt(k) for k in kept]
        return [x / sum(w) for x in w]

    z = [NEG_INF, 2.0, 1.0, 0.5, -1.0, NEG_INF]
    assert_dist(sampler.probabilities(logits), expected(z, 6.0))
    token = sampler.sample(logits)
    assert token in {1, 2, 3, 4}
    mu = 6.0 - 0.1 * (-math.log2(softmax(z)[token]) - 3.0)
    assert sampler.mu == pytest.approx(mu)
    # Next step: the chosen token is penalised (positive logits / 1.2, negative ones * 1.2); token 5 is
    # no longer the last consumed token, and the ban on token 0 stays.
    z2 = list(raw)
    z2[0] = NEG_INF
    z2[token] = z2[token] / 1.2 if z2[token] > 0 else z2[token] * 1.2
    assert_dist(sampler.probabilities(logits), expected(z2, mu))


def test_flat_top_p_rejection_draws_follow_the_nucleus_ties_by_id(monkeypatch: pytest.MonkeyPatch) -> None:
    """A flat 65536-token row is drawn by rejection. 20 tied tokens hold 0.64 of the mass and top_p 0.5
    cuts through them: the nucleus is the 16 lowest ids of the tie (the 16th's mass before it is 0.48),
    each 1/16 of the draws; about 1 in 18 draws misses four times and takes the exact search."""
    from rwkv_gateway.engine import distributions

    vocab = 65536
    tied = sorted(torch.randperm(vocab, generator=torch.Generator().manual_seed(3))[:20].tolist())
    probs = torch.full((vocab,), 0.36 / (vocab - 20), dtype=torch.float64)
    probs[tied] = 0.032
    logits = probs.log().float()
    searches = {"n": 0}
    real = distributions.nucleus_by_histogram

    def counted(p: torch.Tensor, top_p: float) -> Any:
        searches["n"] += 1
        return real(p, top_p)

    monkeypatch.setattr(distributions, "nucleus_by_histogram", counted)
    sampler = make(vocab, top_p=0.5, seed=11)
    allowed = torch.nonzero(sampler.probabilities(logits)).flatten().tolist()
    assert allowed == tied[:16]
    searches["n"] = 0
    draws = 3200
    counts = Counter(sampler.sample(logits) for _ in range(draws))
    assert set(counts) == set(tied[:16])
    for token in tied[:16]:
        assert counts[token] / draws == pytest.approx(1 / 16, abs=0.02)
    assert 0 < searches["n"] < draws / 6  # the fallback ran, and only for the unlucky draws
