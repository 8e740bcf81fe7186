"""The batched sampler of a scheduler step: the CPU path is exactly `Sampler.sample` row by row; the
vectorised (accelerator) path draws from the same distributions with one host transfer, confined
row failures, and Mirostat bookkeeping."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import pytest
import torch

from rwkv_gateway.domain.types import SamplingParams
from rwkv_gateway.engine import sampler as sampler_mod
from rwkv_gateway.engine.sampler import Sampler, sample_batch
from rwkv_gateway.errors import GenerationFailed

VOCAB = 12
KNOBS: list[dict[str, Any]] = [
    {"temperature": 0.0},
    {"temperature": 1.0},
    {"temperature": 0.7, "top_p": 0.6},
    {"temperature": 1.3, "top_k": 3},
    {"temperature": 1.0, "top_k": 5, "top_p": 0.5},
    {"temperature": 1.0, "min_p": 0.3},
    {"temperature": 1.0, "top_p": 0.8, "min_p": 0.1},
    {"temperature": 1.0, "top_p": 0.0},
    {"temperature": 1.0, "mirostat_tau": 2.0, "mirostat_eta": 0.1},
    {"temperature": 1.0, "banned_tokens": frozenset({0, 1}), "logit_bias": {5: 1.5}},
    {"temperature": 1.0, "presence_penalty": 0.5, "repetition_penalty": 1.4},
    {"temperature": 2.0, "min_p": 0.2, "temperature_last": True},
    {"temperature": 0.5, "top_p": 0.7, "temperature_last": True},
    {
        "temperature": 1.5,
        "temperature_last": True,
        "mirostat_tau": 2.0,
        "mirostat_variant": "rwkv",
        "min_p": 0.1,
        "avoid_repeat_tokens": frozenset({3}),
        "preceding_token": 3,
    },
]


def make(seed: int, **knobs: Any) -> Sampler:
    return Sampler(SamplingParams(seed=seed, **knobs), VOCAB)


def rows(count: int, seed: int = 5) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return list(torch.randn(count, VOCAB, generator=gen) * 2)


def test_cpu_path_is_each_samplers_own_sample() -> None:
    logits = rows(len(KNOBS))
    batched = [make(i, **k) for i, k in enumerate(KNOBS)]
    single = [make(i, **k) for i, k in enumerate(KNOBS)]
    for _ in range(15):
        got = sample_batch(batched, logits)
        want = [s.sample(row) for s, row in zip(single, logits, strict=True)]
        assert got == want


@pytest.mark.parametrize("knobs", KNOBS, ids=[str(k) for k in KNOBS])
def test_vectorised_draws_from_the_same_distribution(knobs: dict[str, Any]) -> None:
    (logits,) = rows(1, seed=9)
    reference = make(0, **knobs)
    if "mirostat_tau" in knobs:
        # Mirostat's distribution moves with mu; compare the first draw of many fresh samplers.
        expected = reference.probabilities(logits)
        samplers = [make(seed, **knobs) for seed in range(4000)]
        tokens = sample_batch(samplers, [logits] * len(samplers), vectorised=True)
    else:
        expected = reference.probabilities(logits)
        tokens = []
        for chunk in range(8):  # 8 steps of 500 fresh rows, no penalties accumulate between them
            samplers = [make(chunk * 500 + seed, **knobs) for seed in range(500)]
            tokens += sample_batch(samplers, [logits] * len(samplers), vectorised=True)
    assert all(isinstance(t, int) for t in tokens)
    counts = Counter(tokens)
    n = len(tokens)
    for token in counts:
        assert expected[int(token)] > 0, f"token {token} is outside the distribution's support"
    for token in range(VOCAB):
        p = float(expected[token])
        sigma = math.sqrt(max(p * (1 - p), 1e-12) / n)
        assert counts.get(token, 0) / n == pytest.approx(p, abs=5 * sigma + 1e-3)


def test_vectorised_greedy_and_penalties_match_the_cpu_path() -> None:
    logits = rows(6, seed=3)
    knobs = {"temperature": 0.0, "presence_penalty": 0.8, "repetition_penalty": 1.5, "logit_bias": {2: 0.5}}
    cpu = [make(i, **knobs) for i in range(6)]
    vec = [make(i, **knobs) for i in range(6)]
    for _ in range(10):
        assert sample_batch(vec, logits, vectorised=True) == [
            s.sample(r) for s, r in zip(cpu, logits, strict=True)
        ]


def test_vectorised_mirostat_updates_mu_like_the_cpu_path() -> None:
    # One dominant token: Mirostat keeps only it, so both paths choose it with probability 1.
    logits = torch.full((VOCAB,), -30.0)
    logits[4] = 5.0
    for variant in ("llama", "rwkv"):
        knobs: dict[str, Any] = {"mirostat_tau": 3.0, "mirostat_eta": 0.2, "mirostat_variant": variant}
        cpu, vec = make(1, **knobs), make(1, **knobs)
        for _ in range(5):
            assert sample_batch([vec], [logits], vectorised=True) == [cpu.sample(logits)] == [4]
            assert vec.mu == pytest.approx(cpu.mu)


def test_vectorised_rows_fail_alone() -> None:
    good = torch.randn(VOCAB)
    nan = good.clone()
    nan[3] = float("nan")
    banned = make(1, temperature=1.0, banned_tokens=frozenset(range(VOCAB)))
    out = sample_batch([make(0), make(2), banned], [good, nan, good], vectorised=True)
    assert isinstance(out[0], int)
    assert isinstance(out[1], GenerationFailed) and "NaN" in str(out[1])
    assert isinstance(out[2], GenerationFailed) and "banned" in str(out[2])


def test_vectorised_positive_infinity_shares_the_mass() -> None:
    logits = torch.zeros(VOCAB)
    logits[[2, 7]] = float("inf")
    tokens = sample_batch([make(s) for s in range(400)], [logits] * 400, vectorised=True)
    assert set(tokens) == {2, 7}


def test_vectorised_makes_one_host_transfer(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = 0
    real_cpu = torch.Tensor.cpu

    def counting_cpu(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return real_cpu(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "cpu", counting_cpu)
    samplers = [make(i, **k) for i, k in enumerate(KNOBS)]
    sample_batch(samplers, rows(len(KNOBS)), vectorised=True)
    assert calls == 1


def test_a_vectorised_failure_falls_back_to_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any) -> Any:
        raise RuntimeError("injected")

    monkeypatch.setattr(sampler_mod, "_sample_vectorised", broken)
    logits = rows(3)
    want = [make(i).sample(r) for i, r in enumerate(logits)]
    assert sample_batch([make(i) for i in range(3)], logits, vectorised=True) == want


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_rows_use_the_vectorised_path() -> None:
    logits = [r.cuda() for r in rows(len(KNOBS))]
    out = sample_batch([make(i, **k) for i, k in enumerate(KNOBS)], logits)
    assert all(isinstance(t, int) and 0 <= t < VOCAB for t in out)
    greedy = sample_batch([make(0, temperature=0.0)], logits[:1])
    assert greedy == [int(torch.argmax(logits[0]))]


def test_rows_shared_out_to_a_pool_give_the_same_tokens() -> None:
    from concurrent.futures import ThreadPoolExecutor

    logits = rows(len(KNOBS) * 2)
    knobs = KNOBS * 2
    serial = [make(i, **k) for i, k in enumerate(knobs)]
    pooled = [make(i, **k) for i, k in enumerate(knobs)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        for _ in range(6):
            assert sample_batch(pooled, logits, pool=pool, pool_workers=2) == sample_batch(serial, logits)


@pytest.mark.parametrize("kind", ["flat", "peaked", "mixed"])
def test_large_vocabulary_top_p_rows_are_each_rows_own_draws(kind: str) -> None:
    vocab = 65536
    gen = torch.Generator().manual_seed(21)
    if kind == "flat":
        logits = torch.randn(12, vocab, generator=gen) * 0.3
    elif kind == "peaked":
        logits = torch.randn(12, vocab, generator=gen) * 6
    else:
        logits = torch.randn(12, vocab, generator=gen) * torch.tensor([0.2, 5.0, 1.0, 0.05] * 3).unsqueeze(1)
        logits[5, 7] = float("inf")  # +inf shares the mass: the row leaves the batched path
        logits[6, 100:] = float("-inf")  # a short support
    knobs = [
        {"temperature": t, "top_p": p, "presence_penalty": pp, "logit_bias": lb}
        for t, p, pp, lb in [
            (1.0, 0.9, 0.0, {}),
            (0.7, 0.5, 0.3, {3: 2.0}),
            (1.3, 0.99, 0.0, {}),
            (1.0, 0.2, 0.0, {}),
        ]
        * 3
    ]

    def samplers() -> list[Sampler]:
        return [Sampler(SamplingParams(seed=i, **k), vocab) for i, k in enumerate(knobs)]

    batched, single = samplers(), samplers()
    for _ in range(4):
        got = sample_batch(batched, list(logits))
        want = [s.sample(r) for s, r in zip(single, logits, strict=True)]
        assert got == want
