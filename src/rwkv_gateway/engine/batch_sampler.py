"""The sampler of a scheduler step: the next token of every ready row at once.

This module owns how a step's rows are sampled together: on the CPU row by row through each row's
`Sampler.sample` (shared out to a thread pool when there are many), on an accelerator (or when asked)
in batched device ops with a constant number of host/device copies per step and bounded temporaries.
What each sampling knob means stays in `rwkv_gateway.engine.sampler`; the batched path reads a
`Sampler`'s state (its knobs, `Sampler.adjustments`, its generator and Mirostat `mu`) and records the
drawn tokens back into it.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import torch

from rwkv_gateway.engine.sampler import Adjustments, Sampler
from rwkv_gateway.engine.threads import on_one_thread, single_threaded
from rwkv_gateway.errors import GenerationFailed

__all__ = ["sample_batch"]

logger = logging.getLogger(__name__)

_NEG_INF = float("-inf")
_POS_INF = float("inf")
#: A step samples its rows on several threads from this many rows on (fewer: not worth the hand-off).
_PARALLEL_ROWS = 8
#: Logits entries (rows x vocabulary) the vectorised sampler works on at once: 32 rows of a 65536
#: vocabulary (a row longer than this is a block of its own). The tensors it makes for a block peak
#: at under `_TEMPORARY_BYTES` per entry; with the kernels' own scratch (the sort's, mostly) a step
#: holds about 100 MiB of temporaries whatever its batch, against some 60 bytes per entry of the
#: whole batch unblocked (4 GiB at 1024 rows).
_BLOCK_ENTRIES = 1 << 21
#: The bound on the bytes per block entry of the tensors the vectorised sampler makes (about 32 are
#: live at the peak; a test measures them). The step's tables add a few hundred bytes per row.
_TEMPORARY_BYTES = 40
#: Per-row knobs of the vectorised sampler, in `_knobs` order.
_KNOBS = 8


def sample_batch(
    samplers: Sequence[Sampler],
    rows: Sequence[torch.Tensor],
    *,
    vectorised: bool | None = None,
    pool: Executor | None = None,
    pool_workers: int = 0,
) -> list[int | Exception]:
    """Sample the next token of every row of one scheduler step; a failing row returns its exception
    instead of failing the others.

    On the CPU each row goes through its own `Sampler.sample`: the exact, sort-free filters there cost
    less than any batched formulation, and a row's tokens never depend on its batch-mates. With a
    `pool` of `pool_workers` threads (besides the calling one) the rows are shared out among them: each row
    still runs alone and single-threaded, so its result does not change. On an accelerator (or with
    `vectorised=True`) the rows are sampled together by `_sample_vectorised`: the whole distribution
    work stays on the device, one copy takes every row's inputs there and one brings back every row's
    token. Should that fail as a whole, the rows are sampled one by one from the random state they had
    before: a seeded sequence gets the tokens it would have got had the step gone row by row.
    """
    if not samplers:
        return []
    if vectorised is None:
        vectorised = rows[0].device.type != "cpu"
    if vectorised:
        try:
            drawn = _sample_vectorised(samplers, rows)
        except Exception as exc:  # a shape or device problem: fall back to finding the row it is in
            logger.warning("vectorised sampling failed (%s); sampling row by row", exc)
        else:
            return _record(samplers, drawn)
    # Vectors of a vocabulary's size are too small for intra-op parallelism to pay: with two threads
    # every op waits on a barrier, which costs a few times the op itself on an idle CPU and up to 10x
    # more when another process holds a core. Rows run in parallel instead (torch releases the GIL in
    # its kernels). Matmuls in the forward keep the configured threads.
    with on_one_thread() if rows[0].device.type == "cpu" else contextlib.nullcontext():
        pairs = list(zip(samplers, rows, strict=True))
        workers = pool_workers
        if pool is None or workers < 1 or len(pairs) < _PARALLEL_ROWS:
            return _sample_rows(pairs)
        parts = [pairs[i :: workers + 1] for i in range(workers + 1)]
        futures = [pool.submit(_sample_rows_alone, part) for part in parts[1:]]
        results = [_sample_rows(parts[0]), *(f.result() for f in futures)]
        out: list[int | Exception] = [0] * len(pairs)
        for i, part in enumerate(results):
            out[i :: workers + 1] = part
        return out


def _sample_rows_alone(pairs: Sequence[tuple[Sampler, torch.Tensor]]) -> list[int | Exception]:
    """`_sample_rows` on a helper thread, its torch ops single-threaded too (the intra-op thread count
    is per thread, and a new thread starts with all cores)."""
    single_threaded()
    return _sample_rows(pairs)


def _sample_rows(pairs: Sequence[tuple[Sampler, torch.Tensor]]) -> list[int | Exception]:
    out: list[int | Exception] = []
    for sampler, row in pairs:
        try:
            out.append(sampler.sample(row))
        except Exception as exc:
            out.append(exc)
    return out


@dataclass(frozen=True, slots=True)
class _Drawn:
    """What the vectorised draw found, one entry per row (floats, as they come off the device)."""

    greedy: list[float]
    sampled: list[float]
    #: The sampled token's probability as Mirostat measures it.
    p_chosen: list[float]
    #: The row's largest adjusted logit: NaN for NaN logits, -inf when every token is banned.
    top: list[float]


def _sample_vectorised(samplers: Sequence[Sampler], rows: Sequence[torch.Tensor]) -> _Drawn:
    """Every row's draw in batched device ops, with one host-to-device and one device-to-host copy.

    The same distribution as `Sampler.sample` for every knob (greedy, Mirostat v2, top-k then top-p on
    the renormalised rest, min-p, ties at a cut going to lower ids), computed over a stable descending
    sort of each row. The uniform for each draw comes from the row's own seeded CPU generator, so a
    seed still fixes the sequence of draws; the token a given uniform maps to can differ from the CPU
    path, which inverts the CDF in token-id order.

    Every row's knobs, uniform and adjustment tables travel in one buffer (`_Tables`), so the copies
    of a step do not grow with its batch. The rows are processed in blocks of at most `_BLOCK_ENTRIES`
    logits entries (one row at least), which bounds the temporaries to `_TEMPORARY_BYTES` per entry of
    a block whatever the batch; every op is row by row, so a row's result does not depend on its block.

    No sampler changes here but for one uniform taken from each non-greedy row's generator, and should
    anything fail (on an accelerator an error may only surface at the copy back) the generators are
    put back as they were. `_record` then records the tokens.
    """
    saved = [(s._generator, s._generator.get_state()) for s in samplers if not s._greedy]
    try:
        vocab = samplers[0]._vocab_size
        tables = _Tables(samplers, vocab)
        device = rows[0].device
        buffer = tables.buffer.to(device)  # the one host-to-device copy of the step
        out = torch.empty((4, len(rows)), dtype=torch.float64, device=device)
        block = max(1, _BLOCK_ENTRIES // vocab)
        for start in range(0, len(rows), block):
            stop = min(start + block, len(rows))
            # A new float32 tensor (stack copies), so adjusting it in place leaves the logits alone.
            x = torch.stack([row.detach() for row in rows[start:stop]]).to(torch.float32)
            if x.dim() != 2 or x.shape[1] != vocab:
                raise ValueError(f"expected logits rows of size {vocab}, got {list(x.shape)}")
            tables.adjust_(x, buffer, start)
            out[:, start:stop] = _draw_block(x, tables.knobs(buffer, start, stop))
            del x  # the next block's stack need not share memory with this one
        greedy, sampled, p_chosen, top = out.cpu().tolist()  # the one device-to-host copy
    except BaseException:
        for generator, state in saved:
            generator.set_state(state)
        raise
    return _Drawn(greedy, sampled, p_chosen, top)


def _record(samplers: Sequence[Sampler], drawn: _Drawn) -> list[int | Exception]:
    """Each row's token from `drawn` (or its failure), recorded in its sampler with Mirostat's update."""
    out: list[int | Exception] = []
    for i, sampler in enumerate(samplers):
        top = drawn.top[i]
        if math.isnan(top):
            out.append(GenerationFailed("model produced NaN logits"))
            continue
        if top == _NEG_INF:
            out.append(GenerationFailed("every token is banned or has -inf logit; nothing can be sampled"))
            continue
        token = int(drawn.greedy[i] if sampler._greedy else drawn.sampled[i])
        if not sampler._greedy and sampler._mu is not None:
            p = drawn.p_chosen[i]
            surprise = -math.log2(p) if p > 0 else math.inf
            sampler._mu -= sampler._params.mirostat_eta * (surprise - sampler._tau)
        try:
            sampler.accept(token)
        except Exception as exc:
            out.append(exc)
            continue
        out.append(token)
    return out


def _knobs(s: Sampler, vocab: int) -> list[float]:
    """One row's knobs for `_draw_block` (draws the row's uniform)."""
    return [
        1.0 if s._greedy or s._temperature_last else s._params.temperature,
        float(s._top_k or vocab),
        s._top_p,
        s._min_p,
        _mirostat_threshold(s._mu),
        0.0 if s._greedy else float(torch.rand((), generator=s._generator, dtype=torch.float64)),
        1.0 / s._params.temperature if s._temperature_last else 1.0,
        1.0 if s._rwkv_mirostat else 0.0,
    ]


def _mirostat_threshold(mu: float | None) -> float:
    """Mirostat's probability floor 2**-mu (as in `Sampler._distribution`); -1 when Mirostat is off."""
    if mu is None:
        return -1.0
    return 2.0**-mu if mu > -1000.0 else math.inf


@dataclass(frozen=True, slots=True)
class _Segment:
    """A run of the step's buffer holding one list of entries per row, the rows in batch order: row
    i's entries are `offsets[i]:offsets[i + 1]` counted from `start`."""

    start: int
    offsets: list[int]

    def empty(self, first: int, stop: int) -> bool:
        return self.offsets[first] == self.offsets[stop]

    def of(self, buffer: torch.Tensor, first: int, stop: int) -> torch.Tensor:
        """The entries of rows first..stop-1 (a view: their offsets are known on the host)."""
        return buffer[self.start + self.offsets[first] : self.start + self.offsets[stop]]


class _Tables:
    """A step's per-row inputs packed into one float64 host buffer, so that one copy moves them all.

    The buffer holds every row's `_knobs`, then for each table of `Adjustments` the flat positions
    (row * vocab + token id) of every row's entries and, where the table has them, their values. A
    block of rows owns one slice of each segment, found from host-side offsets, so nothing is read
    back from the device to apply them. Positions stay far below 2**53 and the values are float32, so
    float64 carries both exactly.
    """

    def __init__(self, samplers: Sequence[Sampler], vocab: int) -> None:
        self.vocab = vocab
        self._rows = len(samplers)
        knobs = torch.tensor([_knobs(s, vocab) for s in samplers], dtype=torch.float64)
        adjustments = [s.adjustments() for s in samplers]
        parts = [knobs.view(-1)]

        def segment(values: torch.Tensor, offsets: list[int]) -> _Segment:
            seg = _Segment(sum(p.numel() for p in parts), offsets)
            parts.append(values.to(torch.float64))
            return seg

        def positions(tables: list[torch.Tensor]) -> tuple[_Segment, torch.Tensor]:
            counts = torch.tensor([t.numel() for t in tables])
            at = torch.cat(tables) + (torch.arange(len(tables)) * vocab).repeat_interleave(counts)
            return segment(at, list(itertools.accumulate(counts.tolist(), initial=0))), counts

        no_ids, no_values = torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.float32)
        plain = Adjustments(no_ids, no_values, no_ids, no_ids, no_values, no_ids, 1.0)
        rows = [plain if a is None else a for a in adjustments]
        self._bias_at, _ = positions([a.bias_ids for a in rows])
        self._bias = segment(torch.cat([a.bias for a in rows]), self._bias_at.offsets)
        self._ban_at, _ = positions([a.ban_ids for a in rows])
        self._penalty_at, _ = positions([a.penalty_ids for a in rows])
        self._penalty = segment(torch.cat([a.penalties for a in rows]), self._penalty_at.offsets)
        self._repeat_at, counts = positions([a.repeat_ids for a in rows])
        # float32 as `Sampler._adjust_`'s kernels use the Python float: the same quotients, bit for bit.
        factors = torch.tensor([a.repetition for a in rows], dtype=torch.float32)
        self._repeat = segment(factors.repeat_interleave(counts), self._repeat_at.offsets)
        self.buffer = torch.cat(parts)

    def knobs(self, buffer: torch.Tensor, first: int, stop: int) -> torch.Tensor:
        """Rows first..stop-1 of the knobs in `buffer` (the device copy of `self.buffer`)."""
        return buffer[: self._rows * _KNOBS].view(self._rows, _KNOBS)[first:stop]

    def adjust_(self, x: torch.Tensor, buffer: torch.Tensor, first: int) -> None:
        """`Sampler._adjust_` in place on the block `x` of rows first.., in the same order."""
        flat = x.view(-1)
        stop = first + x.shape[0]
        shift = first * self.vocab

        def at(seg: _Segment) -> torch.Tensor:
            return seg.of(buffer, first, stop).long() - shift

        def values(seg: _Segment) -> torch.Tensor:
            return seg.of(buffer, first, stop).to(torch.float32)

        if not self._bias_at.empty(first, stop):
            flat.index_add_(0, at(self._bias_at), values(self._bias))
        if not self._ban_at.empty(first, stop):
            flat.index_fill_(0, at(self._ban_at), _NEG_INF)
        if not self._penalty_at.empty(first, stop):
            flat.index_add_(0, at(self._penalty_at), values(self._penalty), alpha=-1)
        if not self._repeat_at.empty(first, stop):
            ids, factor = at(self._repeat_at), values(self._repeat)
            v = flat[ids]
            flat[ids] = torch.where(v > 0, v / factor, v * factor)


def _draw_block(x: torch.Tensor, knobs: torch.Tensor) -> torch.Tensor:
    """The draws of a block of adjusted float32 rows `x` ([rows, vocab], overwritten) with their
    `_knobs` ([rows, _KNOBS] float64): [4, rows] float64 of the greedy token, the sampled token, its
    probability for Mirostat and the row's largest logit."""
    temp, top_k, top_p, min_p, miro, uniform, inv_temp_last, rwkv_miro = knobs.unbind(1)
    vocab = x.shape[1]
    rowmax = x.amax(dim=1)
    greedy_tok = torch.argmax(x, dim=1)  # first maximal index: ties go to the lowest id
    z = x.div_(temp.to(torch.float32).unsqueeze(1))  # in place: the unscaled rows are not needed again
    pos_inf = z == _POS_INF
    has_pos_inf = pos_inf.any(dim=1, keepdim=True)
    probs = torch.where(
        has_pos_inf,
        pos_inf.to(torch.float32) / pos_inf.sum(1, keepdim=True).clamp_min(1),
        torch.softmax(z, 1),
    )
    del pos_inf
    vals, ids = torch.sort(probs, dim=1, descending=True, stable=True)
    del probs
    rank = torch.arange(vocab, device=x.device).unsqueeze(0)
    keep = rank < top_k.unsqueeze(1)
    cum = torch.cumsum(vals * keep, dim=1, dtype=torch.float64)
    target = top_p.unsqueeze(1) * cum[:, -1:]
    nucleus = ((cum < target) & keep).sum(1, keepdim=True) + 1
    del cum
    nucleus = torch.where(top_p.unsqueeze(1) >= 1.0, top_k.unsqueeze(1).long(), nucleus)
    keep &= rank < nucleus
    keep &= vals >= min_p.unsqueeze(1).to(torch.float32) * vals[:, :1]
    mirostat = miro >= 0
    miro_cut = torch.minimum(miro.to(torch.float32), vals[:, 0]).unsqueeze(1)
    miro_keep = vals >= miro_cut
    # The "rwkv" Mirostat keeps min-p after its truncation.
    miro_keep &= (rwkv_miro.unsqueeze(1) == 0) | (vals >= min_p.unsqueeze(1).to(torch.float32) * vals[:, :1])
    keep = torch.where(mirostat.unsqueeze(1), miro_keep, keep)
    del miro_keep
    keep[:, 0] = True  # the most probable token always stays
    # temperature_last rows: w = q ** (1 / T) relative to the top weight (others have exponent 1).
    weights = torch.where(keep, (vals / vals[:, :1]).pow_(inv_temp_last.to(torch.float32).unsqueeze(1)), 0.0)
    cdf = torch.cumsum(weights, dim=1, dtype=torch.float64)
    total = cdf[:, -1:]
    j = torch.searchsorted(cdf, uniform.unsqueeze(1) * total, right=True)
    del cdf
    j = torch.minimum(j, keep.sum(1, keepdim=True) - 1)  # u rounded up to the total: the last kept
    sampled_tok = ids.gather(1, j).squeeze(1)
    p_chosen = torch.where(
        rwkv_miro > 0,
        vals.gather(1, j).double().squeeze(1),
        (weights.gather(1, j).double() / total).squeeze(1),
    )
    return torch.stack((greedy_tok.double(), sampled_tok.double(), p_chosen, rowmax.double()))
