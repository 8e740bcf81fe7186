"""The batched sampler of a scheduler step: the CPU path is exactly `Sampler.sample` row by row; the
vectorised (accelerator) path draws from the same distributions with one copy to the device and one
back whatever the batch, bounded temporaries, confined row failures, a fallback that leaves seeded
draws alone, and Mirostat bookkeeping."""

from __future__ import annotations

import math
import weakref
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from rwkv_gateway.domain.types import SamplingParams
from rwkv_gateway.engine import batch_sampler
from rwkv_gateway.engine.batch_sampler import sample_batch
from rwkv_gateway.engine.sampler import Sampler
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


def test_a_vectorised_failure_falls_back_to_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any) -> Any:
        raise RuntimeError("injected")

    monkeypatch.setattr(batch_sampler, "_sample_vectorised", broken)
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


# -- the vectorised path's copies, memory and failures, on the CPU (a `meta` device stands in for an
# accelerator where only the host/device traffic matters) ---------------------------------------------

#: Every table of `Sampler.adjustments` non-empty on every row once a few tokens have been recorded.
ADJUSTED: dict[str, Any] = {
    "temperature": 0.8,
    "presence_penalty": 0.4,
    "frequency_penalty": 0.3,
    "penalty_decay": 0.9,
    "repetition_penalty": 1.3,
    "logit_bias": {1: -2.0, 7: 3.0},
    "banned_tokens": frozenset({2}),
    "avoid_repeat_tokens": frozenset({5}),
}


def adjusted(seed: int, vocab: int = VOCAB, **knobs: Any) -> Sampler:
    sampler = Sampler(SamplingParams(seed=seed, **{**ADJUSTED, **knobs}), vocab)
    for token in (3, 4, 3, 5):
        sampler.accept(token)
    return sampler


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]


#: Reads that need a tensor's data on the host.
_HOST_READS = {
    torch.Tensor.cpu,
    torch.Tensor.tolist,
    torch.Tensor.item,
    torch.Tensor.numpy,
    torch.Tensor.__float__,
    torch.Tensor.__int__,
    torch.Tensor.__bool__,
    torch.Tensor.__index__,
}


def _on_host(target: Any) -> bool:
    if isinstance(target, str | torch.device):
        return torch.device(target).type == "cpu"
    return isinstance(target, torch.Tensor) and target.device.type == "cpu"


def _zeros_for(arg: Any) -> Any:
    """A host stand-in for a meta tensor's data (other arguments as they are)."""
    return torch.zeros(arg.shape, dtype=arg.dtype) if isinstance(arg, torch.Tensor) and arg.is_meta else arg


class MetaTransfers(TorchFunctionMode):
    """Counts the copies between the host and the `meta` device, standing in for an accelerator.

    Up: any call that mixes host tensors with meta ones or makes a meta tensor from host data
    (`.to("meta")`, `copy_`, a host index into a meta tensor, `torch.tensor(..., device="meta")`).
    Down: any read of a meta tensor's data on the host; since a meta tensor has none, it reads zeros
    of the same shape instead, so that the caller carries on.
    """

    def __init__(self) -> None:
        super().__init__()
        self.up = 0
        self.down = 0

    def __torch_function__(
        self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        inputs = _tensors((args, kwargs))
        meta_in = any(t.is_meta for t in inputs)
        if func is torch.Tensor.copy_:
            to_host = args[0].device.type == "cpu"
        elif func is torch.Tensor.to:
            to_host = any(_on_host(a) for a in (*args[1:], kwargs.get("device")))
        else:
            to_host = func in _HOST_READS
        if meta_in and to_host:
            self.down += 1
            return func(*(_zeros_for(a) for a in args), **kwargs)
        out = func(*args, **kwargs)
        meta_out = any(t.is_meta for t in _tensors(out))
        host_in = any(t.device.type == "cpu" for t in inputs)
        if (host_in and (meta_in or meta_out)) or (meta_out and func in (torch.tensor, torch.as_tensor)):
            self.up += 1
        return out


@pytest.mark.parametrize("batch", [2, 16, 32])
def test_vectorised_copies_per_step_do_not_grow_with_the_batch(batch: int) -> None:
    samplers = [adjusted(i, top_p=0.9) for i in range(batch)]
    rows = list(torch.empty(batch, VOCAB, device="meta"))
    for _ in range(3):  # the first step and later ones (nothing is cached on the device between)
        counter = MetaTransfers()
        with counter:
            out = sample_batch(samplers, rows)  # not CPU rows: the vectorised path by default
        assert all(isinstance(t, int) for t in out), out  # no row-by-row fallback
        assert (counter.up, counter.down) == (1, 1)


def test_the_flat_adjustment_tables_are_each_rows_own() -> None:
    knobs: list[dict[str, Any]] = [
        {},
        {"logit_bias": {}, "banned_tokens": frozenset()},
        {"presence_penalty": 0.0, "frequency_penalty": 0.0},
        {"repetition_penalty": 0.7, "avoid_repeat_tokens": frozenset({2, 5})},
        {"penalty_decay": 1.0, "banned_tokens": frozenset(range(6))},
    ]
    samplers = [adjusted(i, **k) for i, k in enumerate(knobs)]
    samplers.insert(2, make(9))  # a row with no adjustment at all
    logits = torch.randn(len(samplers), VOCAB, generator=torch.Generator().manual_seed(4)) * 3
    tables = batch_sampler._Tables(samplers, VOCAB)
    want = torch.stack([s._penalised(row) for s, row in zip(samplers, logits, strict=True)])
    whole = logits.clone()
    tables.adjust_(whole, tables.buffer, 0)
    assert torch.equal(whole, want)
    for first, stop in [(0, 2), (2, 3), (3, 6)]:  # blocks see only their rows' entries
        block = logits[first:stop].clone()
        tables.adjust_(block, tables.buffer, first)
        assert torch.equal(block, want[first:stop])


class LiveBytes(TorchFunctionMode):
    """The most bytes held at once by the tensors made inside the mode: each new storage counts from
    the call that returns it until it is freed (those of `existing` and views of older tensors never)."""

    def __init__(self, existing: Sequence[torch.Tensor]) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._counted = {id(t.untyped_storage()) for t in existing}

    def __torch_function__(
        self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        given = {id(t.untyped_storage()) for t in _tensors((args, kwargs))}
        for t in _tensors(out):
            storage = t.untyped_storage()
            # A view, or an argument returned as it is (`.to` to its own dtype), allocates nothing.
            if not t._is_view() and id(storage) not in given and id(storage) not in self._counted:
                self._counted.add(id(storage))
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._free, id(storage), storage.nbytes())
        return out

    def _free(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._counted.discard(key)


def test_vectorised_temporaries_are_bounded_whatever_the_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    vocab, block_rows = 2048, 4
    monkeypatch.setattr(batch_sampler, "_BLOCK_ENTRIES", block_rows * vocab)
    knobs: list[dict[str, Any]] = [{"top_p": 0.9}, {"temperature": 0.0}, {"top_k": 40}, {"mirostat_tau": 3.0}]
    peaks = {}
    for batch in (block_rows, 16 * block_rows):
        samplers = [adjusted(i, vocab, **knobs[i % 4]) for i in range(batch)]
        logits = list(torch.randn(batch, vocab, generator=torch.Generator().manual_seed(batch)) * 3)
        for _ in range(2):
            tracker = LiveBytes(logits)
            with tracker:
                assert all(isinstance(t, int) for t in sample_batch(samplers, logits, vectorised=True))
        peaks[batch] = tracker.peak
    # The bound of `_BLOCK_ENTRIES`, plus the step's tables: a few hundred bytes a row at this size.
    for batch, peak in peaks.items():
        assert peak <= batch_sampler._TEMPORARY_BYTES * block_rows * vocab + 1024 * batch
    assert peaks[16 * block_rows] < 1.25 * peaks[block_rows]


def test_blocks_of_rows_give_the_same_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    knobs = [*KNOBS, ADJUSTED, {**ADJUSTED, "temperature": 0.0}]

    def run(block_entries: int) -> list[list[int | str]]:
        monkeypatch.setattr(batch_sampler, "_BLOCK_ENTRIES", block_entries)
        samplers = [make(i, **k) for i, k in enumerate(knobs)]
        gen = torch.Generator().manual_seed(8)
        steps = []
        for _ in range(10):
            logits = list(torch.randn(len(knobs), VOCAB, generator=gen) * 2)
            out = sample_batch(samplers, logits, vectorised=True)
            steps.append([t if isinstance(t, int) else repr(t) for t in out])
        return steps

    # Blocks of 3 rows, of one row, and one block for the whole step.
    assert run(3 * VOCAB) == run(1) == run(1 << 30)


class FailOnce(TorchFunctionMode):
    def __init__(self, func: Any) -> None:
        super().__init__()
        self.func = func
        self.failed = False

    def __torch_function__(
        self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        if func is self.func and not self.failed:
            self.failed = True
            raise RuntimeError("injected")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("where", [torch.searchsorted, torch.Tensor.cpu], ids=["draw", "copy back"])
def test_a_failed_vectorised_step_does_not_change_a_seeded_sequence(where: Any) -> None:
    """The fallback draws what the row path would have drawn in the first place, and the later steps
    continue the same seeded sequence (the failed attempt consumed no random numbers)."""
    knobs = [k for k in KNOBS if k.get("temperature") != 0.0] + [ADJUSTED]
    logits = rows(len(knobs), seed=11)
    failed = [make(i, **k) for i, k in enumerate(knobs)]
    row_by_row = [make(i, **k) for i, k in enumerate(knobs)]
    for step in range(5):
        if step == 2:
            with FailOnce(where) as injected:
                got = sample_batch(failed, logits, vectorised=True)
            assert injected.failed
            want = sample_batch(row_by_row, logits, vectorised=False)
        else:
            got = sample_batch(failed, logits, vectorised=True)
            want = sample_batch(row_by_row, logits, vectorised=True)
        assert got == want, f"step {step}"
        assert [s.mu for s in failed] == [s.mu for s in row_by_row]
