"""Top-p nuclei and seeded draws over one probability vector: what `Sampler` (sampler.py) builds a
row's distribution from and draws its token with, exactly and without sorting the vocabulary.

`Dist` is a (possibly truncated) distribution; `nucleus` / `nucleus_by_histogram` find the smallest
set of most probable tokens holding `top_p` of the mass (ties at the cut going to lower ids); `draw`
inverts the CDF with one uniform from the row's own generator, and `draw_within` draws from a nucleus
by rejection without finding it first.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import torch

_NEG_INF = float("-inf")
_POS_INF = float("inf")
#: How many top tokens the cheap first try of `nucleus` takes (enough for a peaked distribution).
_NUCLEUS_FIRST_K = 64
#: That try is made only when the top probability is at least top_p / this (a flatter distribution
#: cannot fit its nucleus into 64 tokens, and the failed topk would cost as much as the exact search).
NUCLEUS_TRY_RATIO = 8.0
#: Vocabularies up to this size get one stable sort: cheaper than the histogram's fixed cost.
NUCLEUS_SORT_VOCAB = 2048
#: Boundary bands up to this size are sorted; larger ones (near-uniform or tie-heavy distributions)
#: are resolved by a second histogram over the low 16 bits of the float32 keys.
_NUCLEUS_SORT_BAND = 2048
#: Block length of the two-level inverse-CDF draw (see `draw`).
_DRAW_BLOCK = 256
#: Top-p from this value up is drawn by rejection (see `draw_within`): at least this share of draws
#: is accepted, so the expected number of tries stays at or below two.
REJECT_MIN_TOP_P = 0.5
#: Rejected draws after which the nucleus is found exactly instead (a small nucleus).
_REJECT_TRIES = 4


@dataclass(frozen=True, slots=True)
class Dist:
    """Unnormalised non-negative weights, either one per token id (`ids` None) or for `ids` only."""

    weights: torch.Tensor
    ids: torch.Tensor | None
    #: The full distribution the weights were selected from (before truncation).
    probs: torch.Tensor
    #: Set when `weights` is all of `probs` but only its top-p nucleus for this top_p may be drawn
    #: (the nucleus not searched for yet; see `draw_within` and `nucleus`).
    within: float | None = None

    def nucleus(self) -> Dist:
        """The same distribution with every weight outside it zeroed (itself unless `within`)."""
        if self.within is None:
            return self
        return nucleus_by_histogram(self.probs, self.within)[0]


def nucleus(probs: torch.Tensor, top_p: float, *, peak: float | None = None) -> tuple[Dist, float]:
    """Top-p of float32 `probs` (non-negative, some positive): the smallest set of most probable tokens
    holding `top_p` of the mass, ties at the boundary going to the lower ids (top_p 0: the top token).
    Also returns the set's smallest probability, `floor`: every token above it is in the set. `peak`
    is `probs.max()` when the caller already has it.

    Sorting 65536 floats costs milliseconds on CPU, so only the tokens whose order matters are ordered:

    * A small vocabulary is simply sorted.
    * A peaked distribution's nucleus fits in a topk(64), tried when the top probability allows it.
    * Otherwise a histogram finds the boundary. The bit patterns of non-negative float32 numbers order
      like the numbers, so bucketing by the high 16 bits (exponent and 7 mantissa bits) and summing
      each bucket in float64 (exactly: a bucket's values share one exponent) shows in which bucket the
      mass, accumulated from the top, reaches the target. Every token of a higher bucket is in the
      nucleus without being ordered; only the boundary bucket (a narrow band of values) is sorted to
      decide how many of its tokens to take, or, if it is large (a near-uniform or tie-heavy
      distribution), bucketed again by the low 16 bits, which leaves exact ties, taken by id.

    The first two give compact (weights, ids) sorted by descending weight, the last full-vocabulary
    weights with zeros outside the nucleus.
    """
    if top_p <= 0.0:
        top = int(torch.argmax(probs))  # the first maximal index: ties go to the lowest id
        return Dist(probs[top : top + 1], torch.tensor([top], device=probs.device), probs), float(probs[top])
    if probs.shape[0] <= NUCLEUS_SORT_VOCAB:
        vals, ids = torch.sort(probs, descending=True, stable=True)
        n = nucleus_size(vals, top_p)
        return Dist(vals[:n], ids[:n], probs), float(vals[n - 1])
    if (float(probs.max()) if peak is None else peak) * NUCLEUS_TRY_RATIO >= top_p:
        k = min(_NUCLEUS_FIRST_K, probs.shape[0])
        vals, ids = torch.topk(probs, k)
        target = top_p * float(probs.sum(dtype=torch.float64))
        n = int((torch.cumsum(vals, 0, dtype=torch.float64) < target).sum()) + 1
        if n < k:
            last, after = vals[n - 1 : n + 1].tolist()
            # A tie across the cut would leave the choice among equal tokens to topk: not by id.
            if after < last:
                return Dist(vals[:n], ids[:n], probs), last
    return nucleus_by_histogram(probs, top_p)


def nucleus_by_histogram(probs: torch.Tensor, top_p: float) -> tuple[Dist, float]:
    """The histogram search of `nucleus` (which see; top_p > 0); returns full-vocabulary weights."""
    keys = probs.view(torch.int32)
    high = keys >> 16
    exact = probs.double()
    mass = torch.bincount(high, weights=exact)
    cum = mass.flip(0).cumsum(0)  # cumulative mass of the buckets from the most probable down
    last = cum.shape[0] - 1
    target = top_p * float(cum[last])
    i = min(int(torch.searchsorted(cum, target)), last)  # the first bucket that reaches the target
    above = float(cum[i - 1]) if i else 0.0
    bucket = last - i
    # The bucket's values are at least its lower edge, so mass / edge bounds how many tokens it holds.
    edge = _float32_from_bits(bucket << 16)
    if float(mass[bucket]) <= _NUCLEUS_SORT_BAND * edge:
        band = _indices_equal(high, bucket)  # ascending ids
        vals, order = torch.sort(probs[band], descending=True, stable=True)
        ids = band[order]  # stable: equal values stay in id order
        acc = vals.double()
    else:
        # Too many to sort: a second histogram over the low 16 bits, within the bucket, pins the exact
        # boundary value; the tokens that have it are ties, taken in id order.
        # Slot 0 takes the tokens below the bucket, 1 + low bits those inside, 65537 those above.
        slots = (keys - ((bucket << 16) - 1)).clamp_(0, (1 << 16) + 1)
        cum = torch.bincount(slots, weights=exact, minlength=(1 << 16) + 2)[1:-1].flip(0).cumsum(0)
        # Searched relative to `above`, so that the chosen value always has tokens, even where adding
        # it to `above` would round away.
        j = int(torch.searchsorted(cum, min(target - above, float(cum[-1]))))
        above += float(cum[j - 1]) if j else 0.0
        key = (bucket << 16) | (0xFFFF - j)
        ids = _indices_equal(keys, key)
        acc = torch.full(ids.shape, _float32_from_bits(key), dtype=torch.float64, device=probs.device)
    # Accumulate the band in order, continuing from the mass above it: it needs the first m.
    acc[0] += above
    m = min(int(torch.searchsorted(acc.cumsum(0), target)) + 1, ids.shape[0])
    floor = float(probs[ids[m - 1]])
    # Every token >= floor, except those equal to it after the last one taken (ties go by id).
    weights = torch.threshold(probs, float32_below(floor), 0.0)
    torch.threshold_(weights[int(ids[m - 1]) + 1 :], floor, 0.0)
    return Dist(weights, None, probs), floor


def _indices_equal(values: torch.Tensor, value: int) -> torch.Tensor:
    """Ascending indices where the 1-D integer tensor equals `value`. On the CPU through numpy, whose
    flatnonzero is several times faster than torch.nonzero for a 65536-wide vector."""
    if values.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(values.numpy() == value))
    return torch.nonzero(values == value).squeeze(1)


def _float32_from_bits(bits: int) -> float:
    return float(struct.unpack("<f", struct.pack("<I", bits))[0])


def float32_below(value: float) -> float:
    """The largest float32 below the non-negative float32 `value`: for float32 p, p > it <=> p >= value."""
    bits = int(struct.unpack("<I", struct.pack("<f", value))[0])
    return _float32_from_bits(bits - 1) if bits else -1.0


def nucleus_size(sorted_vals: torch.Tensor, top_p: float) -> int:
    """How many of the descending `sorted_vals` make the smallest prefix holding `top_p` of their mass
    (at least 1; top_p 0 gives 1)."""
    cum = torch.cumsum(sorted_vals, 0, dtype=torch.float64)
    target = top_p * float(cum[-1])
    return min(int((cum < target).sum()) + 1, sorted_vals.shape[0])


def uniform_over(mask: torch.Tensor) -> torch.Tensor:
    weights = mask.to(torch.float32)
    return weights / weights.sum()


def _inverse_cdf(weights: torch.Tensor, u: float) -> tuple[int, float]:
    """The first index whose cumulative weight exceeds `u` (0 <= u < total), and the cumulative weight
    before it. The strict comparison means a zero weight can never be chosen."""
    cdf = torch.cumsum(weights, 0, dtype=torch.float64)
    j = int(torch.searchsorted(cdf, torch.tensor([u], dtype=torch.float64), right=True)[0])
    if j >= weights.shape[0]:
        # u rounded up to the total: take the last index that has any weight.
        j = int(torch.nonzero(weights)[-1, 0])
    return j, float(cdf[j - 1]) if j else 0.0


def draw(weights: torch.Tensor, generator: torch.Generator) -> tuple[int, float]:
    """Draw one index from non-negative CPU weights (not necessarily normalised, some positive); return
    it and its normalised probability.

    torch.multinomial(w, 1) draws one exponential per entry (about 1.7 ms at V=65536); this draws a
    single uniform. Long vectors go in two levels (block sums, then a cumsum inside one block), since
    a full-length cumsum is sequential and several times slower than blocked sums.
    """
    r = float(torch.rand((), generator=generator, dtype=torch.float64))
    n = weights.shape[0]
    if n <= 4 * _DRAW_BLOCK:
        total = float(weights.sum(dtype=torch.float64))
        j, _ = _inverse_cdf(weights, r * total)
    else:
        blocks, block_sums, total = _blocks(weights)
        j = _draw_from_blocks(blocks, block_sums, r * total)
    return j, float(weights[j]) / total


def _blocks(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """`weights` (zero-padded) as [blocks, _DRAW_BLOCK], each block's float64 sum, and the total."""
    pad = -weights.shape[0] % _DRAW_BLOCK
    padded = torch.cat([weights, weights.new_zeros(pad)]) if pad else weights
    blocks = padded.reshape(-1, _DRAW_BLOCK)
    block_sums = blocks.sum(1, dtype=torch.float64)
    return blocks, block_sums, float(block_sums.sum())


def _draw_from_blocks(blocks: torch.Tensor, block_sums: torch.Tensor, u: float) -> int:
    """The index at cumulative weight `u` (0 <= u < total) of the blocked weights."""
    b, before = _inverse_cdf(block_sums, u)
    # u >= before, so the remainder is never negative; the chosen block has positive weight.
    i, _ = _inverse_cdf(blocks[b], u - before)
    return b * _DRAW_BLOCK + i


def draw_within(probs: torch.Tensor, top_p: float, generator: torch.Generator) -> int:
    """Draw from the top-p nucleus of CPU `probs` without finding the nucleus first.

    A token is in the nucleus exactly when the mass ranked before it (every more probable token, and
    the equally probable ones with lower ids) is below top_p of the total: that is the prefix rule of
    `nucleus`. So a token drawn from all of `probs` and kept only when it passes that test follows
    the renormalised nucleus distribution, at the cost of one pass over the vocabulary per try instead
    of a histogram search. A try succeeds with probability at least top_p; after `_REJECT_TRIES`
    misses the nucleus is searched for after all (the result is the same distribution either way).
    """
    blocks, block_sums, total = _blocks(probs)
    target = top_p * total
    for _ in range(_REJECT_TRIES):
        r = float(torch.rand((), generator=generator, dtype=torch.float64))
        j = _draw_from_blocks(blocks, block_sums, r * total)
        p = float(probs[j])
        # threshold() keeps the values above p; their float64 sum is the mass strictly before p.
        above = float(torch.threshold(probs, p, 0.0).sum(dtype=torch.float64))
        if above < target:
            ties = int((probs[:j] == p).sum()) if j else 0
            if above + ties * p < target:
                return j
    return draw(nucleus_by_histogram(probs, top_p)[0].weights, generator)[0]
