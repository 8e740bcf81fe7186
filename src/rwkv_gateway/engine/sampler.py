"""The per-sequence token sampler: every dialect's sampling knobs applied to one logits vector.

This module owns the meaning of `SamplingParams` once it reaches the engine: logit bias, banned
tokens (and the role-play ban of a just-consumed punctuation token), the RWKV presence/frequency
penalties with decay, the multiplicative repetition penalty, temperature/greedy (before the filters,
or after them with `temperature_last`), Mirostat v2 (llama.cpp's or the RWKV role-play variant),
top-k, top-p, min-p, and the seeded draw. One `Sampler` serves one sequence and keeps that sequence's
sampling state (penalty counts, Mirostat `mu`, the random generator). A step's rows are sampled on the
model thread and its sampling helpers (`batch_sampler.py`); logits may live on CPU or CUDA, and
`sample` draws on the CPU (a GPU step's rows are drawn together on the device by `batch_sampler.py`,
from the same state).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from rwkv_gateway.domain.types import SamplingParams
from rwkv_gateway.engine.distributions import (
    NUCLEUS_SORT_VOCAB,
    NUCLEUS_TRY_RATIO,
    REJECT_MIN_TOP_P,
    Dist,
    draw,
    draw_within,
    float32_below,
    nucleus,
    nucleus_size,
    uniform_over,
)
from rwkv_gateway.errors import GenerationFailed

__all__ = ["Adjustments", "Sampler"]

_NEG_INF = float("-inf")
_POS_INF = float("inf")
_SEED_MASK = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class Adjustments:
    """Steps 3-5 of one row as host tensors, for a batch that applies every row's at once (see
    `rwkv_gateway.engine.batch_sampler`). Each id tensor lists distinct token ids (`ban_ids` may repeat
    one); they apply in field order: add `bias`, set `ban_ids` to -inf, subtract `penalties`, then the
    repetition penalty on `repeat_ids`."""

    bias_ids: torch.Tensor
    bias: torch.Tensor
    ban_ids: torch.Tensor
    penalty_ids: torch.Tensor
    #: float32, what `_adjust_` subtracts (presence + frequency x decayed count).
    penalties: torch.Tensor
    repeat_ids: torch.Tensor
    repetition: float


class Sampler:
    """Samples the tokens of one sequence. Not thread-safe: one thread at a time (the model thread or
    one of its sampling helpers).

    Decisions the knobs leave open:

    * Greedy (temperature <= 0) wins over Mirostat and the filters; Mirostat (when `mirostat_tau`
      is set) replaces top-k, top-p and min-p (the "rwkv" variant keeps min-p, after its cut).
    * Mirostat v2 follows llama.cpp: `mu` starts at 2*tau; tokens whose surprise -log2(p) exceeds
      `mu` are dropped (the most probable token always stays); the draw is from the renormalised
      rest; the observed surprise is -log2 of the chosen token's probability in that *truncated,
      renormalised* distribution (the "rwkv" variant: in the untruncated one), and
      `mu -= eta * (surprise - tau)`. Tokens passed to `accept` from elsewhere (forced tokens) do
      not move `mu`: no distribution was drawn from.
    * Filters are sequential as in HF and llama.cpp: top-p's cumulative mass is measured on the
      distribution renormalised after top-k; min-p compares with the largest remaining probability
      (which is scale-free, so its place in the chain does not matter).
    * Top-p keeps the smallest set of most probable tokens holding `top_p` of the mass (top_p 0: the
      top token). Of tokens tied at the cut the lower ids are taken (after top-k: in torch.topk's order).
    * Logits of +inf share all the mass equally; a sequence whose every token is -inf (all banned)
      fails with GenerationFailed rather than silently emitting token 0.
    """

    def __init__(self, params: SamplingParams, vocab_size: int, *, prompt_tokens: Sequence[int] = ()) -> None:
        if vocab_size <= 0:
            raise ValueError(f"vocab_size must be positive, got {vocab_size}")
        params.validate(vocab_size)
        self._params = params
        self._vocab_size = vocab_size
        self._greedy = params.temperature <= 0
        self._top_k = params.top_k if 0 < params.top_k < vocab_size else 0
        self._top_p = params.top_p
        self._min_p = params.min_p
        self._tau = params.mirostat_tau if params.mirostat_tau is not None else 0.0
        self._mu: float | None = 2.0 * params.mirostat_tau if params.mirostat_tau is not None else None
        self._use_counts = params.presence_penalty != 0.0 or params.frequency_penalty != 0.0
        self._use_repetition = params.repetition_penalty != 1.0

        bias = {tok: b for tok, b in params.logit_bias.items() if b != 0.0}
        self._bias_ids = torch.tensor(sorted(bias), dtype=torch.long)
        self._bias_vals = torch.tensor([bias[t] for t in sorted(bias)], dtype=torch.float32)
        self._ban_ids = torch.tensor(sorted(params.banned_tokens), dtype=torch.long)
        self._avoid_repeat = params.avoid_repeat_tokens
        self._last_token: int | None = prompt_tokens[-1] if prompt_tokens else params.preceding_token
        self._temperature_last = params.temperature_last and params.temperature != 1.0
        self._rwkv_mirostat = params.mirostat_variant == "rwkv"
        #: No bias, bans or penalties: the logits are used as they come.
        self._plain = not (
            bias or params.banned_tokens or self._avoid_repeat or self._use_counts or self._use_repetition
        )
        # Static index tensors are copied to the logits' device once, not once per token.
        self._device_cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

        # occurrence: token -> decayed count of generated tokens; seen: tokens the repetition penalty hits.
        self._occurrence = _TokenTable()
        self._seen = _TokenTable()
        if params.penalize_prompt and self._use_repetition:
            for tok in prompt_tokens:
                self._check_token(tok)
                self._seen.add(tok, 0.0)

        seed = params.seed if params.seed is not None else secrets.randbits(63)
        self._generator = torch.Generator(device="cpu")
        # manual_seed takes [-2**63, 2**64); fold any client integer into that range deterministically.
        self._generator.manual_seed(seed & _SEED_MASK)

    # -- read-only views for the scheduler, metrics and tests ----------------------------------------

    @property
    def params(self) -> SamplingParams:
        return self._params

    @property
    def mu(self) -> float | None:
        """The current Mirostat v2 target surprise (None when Mirostat is off)."""
        return self._mu

    @property
    def occurrence(self) -> Mapping[int, float]:
        """A copy of the decayed counts of generated tokens used by presence/frequency penalties (kept
        only while one of those penalties is non-zero; empty otherwise)."""
        return self._occurrence.as_dict()

    # -- public API ----------------------------------------------------------------------------------

    def sample(self, logits: torch.Tensor) -> int:
        """Choose the next token from `logits` (float [vocab_size], CPU or CUDA) and record it."""
        if self._greedy and self._plain:
            # Nothing changes the logits: no copy, and argmax itself finds a NaN (it ranks NaN first).
            if logits.dim() != 1 or logits.shape[0] != self._vocab_size:
                raise ValueError(f"expected logits of shape [{self._vocab_size}], got {list(logits.shape)}")
            token = int(torch.argmax(logits))
            top = float(logits[token])
            if math.isnan(top):
                raise GenerationFailed("model produced NaN logits")
            if top == _NEG_INF:
                raise GenerationFailed("every token is banned or has -inf logit; nothing can be sampled")
            self.accept(token)
            return token
        x = self._penalised(logits)
        if self._greedy:
            token = self._argmax(x)
        else:
            dist = self._distribution(x)
            if dist.within is not None:
                token = draw_within(dist.weights.detach().to("cpu"), dist.within, self._generator)
            else:
                j, p_chosen = draw(dist.weights.detach().to("cpu"), self._generator)
                token = j if dist.ids is None else int(dist.ids[j])
                if self._mu is not None:
                    if self._rwkv_mirostat:
                        # untruncated (temperature 1 with temperature_last)
                        p_chosen = float(dist.probs[token])
                    surprise = -math.log2(p_chosen) if p_chosen > 0 else math.inf
                    self._mu -= self._params.mirostat_eta * (surprise - self._tau)
        self.accept(token)
        return token

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """The distribution `sample` would draw from next (float32 [V] on the logits' device, sums to
        1), computed without drawing or changing any state. One-hot for greedy."""
        x = self._penalised(logits)
        if self._greedy:
            out = torch.zeros(self._vocab_size, dtype=torch.float32, device=x.device)
            out[self._argmax(x)] = 1.0
            return out
        dist = self._distribution(x).nucleus()
        weights = dist.weights / dist.weights.sum()
        if dist.ids is None:
            return weights
        out = torch.zeros(self._vocab_size, dtype=torch.float32, device=x.device)
        out[dist.ids] = weights
        return out

    def accept(self, token_id: int) -> None:
        """Record a generated token (sampled here or forced elsewhere) for the penalties."""
        self._check_token(token_id)
        if self._use_counts:
            decay = self._params.penalty_decay
            if decay != 1.0:
                # RWKV's PIPELINE decays every count before adding the new token.
                self._occurrence.scale(decay)
            self._occurrence.add(token_id, 1.0)
        if self._use_repetition:
            self._seen.add(token_id, 0.0)
        self._last_token = token_id

    # -- steps ---------------------------------------------------------------------------------------

    def _check_token(self, token_id: int) -> None:
        if not 0 <= token_id < self._vocab_size:
            raise ValueError(f"token id {token_id} is outside the vocabulary of {self._vocab_size}")

    def _static_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cached = self._device_cache.get(device)
        if cached is None:
            cached = (self._bias_ids.to(device), self._bias_vals.to(device), self._ban_ids.to(device))
            self._device_cache[device] = cached
        return cached

    def _penalised(self, logits: torch.Tensor) -> torch.Tensor:
        """Steps 1-5: a float32 copy of `logits` with NaN check, bias, bans and penalties applied."""
        if logits.dim() != 1 or logits.shape[0] != self._vocab_size:
            raise ValueError(f"expected logits of shape [{self._vocab_size}], got {list(logits.shape)}")
        # Nothing below writes into the row it is given, so without adjustments no copy is needed.
        x = logits.detach().to(dtype=torch.float32, copy=not self._plain)
        # max() propagates NaN and costs a tenth of isnan().any() on a 65536-wide CPU vector. Draws
        # take the maximum anyway (`_filtered`), so only greedy rows need it here.
        if self._greedy and math.isnan(float(x.max())):
            raise GenerationFailed("model produced NaN logits")
        if not self._plain:
            self._adjust_(x)
        return x

    def _adjust_(self, x: torch.Tensor) -> None:
        """Steps 3-5 in place on a float32 row: logit bias, bans, presence/frequency and repetition
        penalties (`adjustments` gives the same steps as tables for a batch; the two must agree)."""
        bias_ids, bias_vals, ban_ids = self._static_on(x.device)
        if bias_ids.numel():
            x.index_add_(0, bias_ids, bias_vals)
        if ban_ids.numel():
            x.index_fill_(0, ban_ids, _NEG_INF)
        if self._last_token is not None and self._last_token in self._avoid_repeat:
            x[self._last_token] = _NEG_INF
        p = self._params
        if self._use_counts and len(self._occurrence):
            penalty = p.presence_penalty + self._occurrence.values * p.frequency_penalty
            x.index_add_(0, self._occurrence.ids.to(x.device), penalty.to(x.device, torch.float32), alpha=-1)
        if self._use_repetition and len(self._seen):
            ids = self._seen.ids.to(x.device)
            v = x[ids]
            x[ids] = torch.where(v > 0, v / p.repetition_penalty, v * p.repetition_penalty)

    def adjustments(self) -> Adjustments | None:
        """This step's `_adjust_` as host tables (None when it changes nothing). Recording a token later
        does not change them (a `_TokenTable` never rewrites a filled slot)."""
        if self._plain:
            return None
        p = self._params
        ban_ids = self._ban_ids
        if self._last_token is not None and self._last_token in self._avoid_repeat:
            ban_ids = torch.cat([ban_ids, torch.tensor([self._last_token])])
        none = torch.empty(0, dtype=torch.long)
        penalty_ids, penalties = none, torch.empty(0, dtype=torch.float32)
        if self._use_counts and len(self._occurrence):
            penalty_ids = self._occurrence.ids
            penalties = (p.presence_penalty + self._occurrence.values * p.frequency_penalty).to(torch.float32)
        repeat_ids = self._seen.ids if self._use_repetition else none
        return Adjustments(
            self._bias_ids, self._bias_vals, ban_ids, penalty_ids, penalties, repeat_ids, p.repetition_penalty
        )

    def _argmax(self, x: torch.Tensor) -> int:
        # torch.argmax returns the first maximal index, i.e. ties go to the lowest token id.
        token = int(torch.argmax(x))
        if x[token] == _NEG_INF:
            raise GenerationFailed("every token is banned or has -inf logit; nothing can be sampled")
        return token

    def _distribution(self, x: torch.Tensor) -> Dist:
        """Steps 7-11 on penalised logits (not greedy); with `temperature_last` the filters select on
        the temperature-1 distribution and the temperature reshapes what they keep."""
        as_is = self._temperature_last or self._params.temperature == 1.0  # x / 1 is x, bit for bit
        dist = self._filtered(x if as_is else x / self._params.temperature)
        if not self._temperature_last:
            return dist
        # w = q ** (1 / T), taken relative to the largest weight so that small ones do not underflow.
        w = dist.weights / dist.weights.max()
        return Dist(w.pow_(1.0 / self._params.temperature), dist.ids, dist.probs)

    def _filtered(self, x: torch.Tensor) -> Dist:
        top = float(x.max())
        if math.isnan(top):
            raise GenerationFailed("model produced NaN logits")
        if top == _NEG_INF:
            raise GenerationFailed("every token is banned or has -inf logit; nothing can be sampled")
        # With +inf logits softmax would give NaN; its limit shares all the mass among the +inf tokens.
        probs = uniform_over(x == _POS_INF) if top == _POS_INF else torch.softmax(x, dim=0)

        if self._mu is not None:
            # surprise -log2(p) <= mu  <=>  p >= 2**-mu: one comparison instead of a log over V. Capping
            # the threshold at the top probability always keeps the top token (ties at the top: all).
            threshold = 2.0**-self._mu if self._mu > -1000.0 else math.inf
            top_p = float(probs.max())
            cut = min(threshold, top_p)
            if self._rwkv_mirostat and self._min_p > 0.0:
                cut = max(cut, self._min_p * top_p)  # min-p after the truncation (never above top_p)
            # Only the kept tokens (at most 2**mu of them, usually a few dozen) go on: the temperature's
            # power and the draw then cost nothing next to the softmax. In id order, as a full-width
            # vector with zeros would be drawn from.
            ids = torch.nonzero(probs >= cut).squeeze(1)
            return Dist(probs[ids], ids, probs)

        if self._top_k == 0 and self._top_p >= 1.0 and self._min_p <= 0.0:
            return Dist(probs, None, probs)  # nothing to filter: no sort at all

        if self._top_k == 0 and self._top_p >= 1.0:
            # min-p alone needs only the maximum, not an ordering.
            keep = probs >= self._min_p * probs.max()
            return Dist(torch.where(keep, probs, 0.0), None, probs)

        if self._top_k:
            vals, ids = torch.topk(probs, self._top_k)
            if self._top_p < 1.0:
                n = nucleus_size(vals, self._top_p)
                vals, ids = vals[:n], ids[:n]
            return self._min_p_prefix(vals, ids, probs)
        peak: float | None = None
        if (
            self._min_p <= 0.0
            and not self._temperature_last
            and self._top_p >= REJECT_MIN_TOP_P
            and probs.shape[0] > NUCLEUS_SORT_VOCAB
        ):
            peak = float(probs.max())
            if peak * NUCLEUS_TRY_RATIO < self._top_p:
                # A flat distribution's nucleus is large and costs a histogram search; drawing by
                # rejection needs only the drawn token's rank (peaked ones take `nucleus`'s topk).
                return Dist(probs, None, probs, within=self._top_p)
        dist, floor = nucleus(probs, self._top_p, peak=peak)
        if self._min_p <= 0.0:
            return dist
        if dist.ids is not None:
            return self._min_p_prefix(dist.weights, dist.ids, probs)
        # The nucleus holds every token above `floor` and none below it. Min-p keeps p >= cut: with
        # cut > floor those tokens are all in the nucleus and are the answer; otherwise every token of
        # the nucleus passes. Either way no ordering is needed.
        cut = self._min_p * probs.max()
        if float(cut) > floor:
            # threshold() keeps p > its argument in one pass (where() takes three).
            return Dist(torch.threshold(probs, float32_below(float(cut)), 0.0), None, probs)
        return dist

    def _min_p_prefix(self, vals: torch.Tensor, ids: torch.Tensor, probs: torch.Tensor) -> Dist:
        """Min-p on descending `vals`: a prefix (never empty: vals[0] passes)."""
        if self._min_p > 0.0:
            n = int((vals >= self._min_p * vals[0]).sum())
            vals, ids = vals[:n], ids[:n]
        return Dist(vals, ids, probs)


class _TokenTable:
    """Token ids with one float64 value each, held in tensors that grow by doubling.

    Recording a token is O(1) Python work and applying a penalty is one indexed tensor op; rebuilding
    index tensors from a dict of a few thousand tokens every step costs hundreds of microseconds.
    """

    def __init__(self) -> None:
        self._slots: dict[int, int] = {}
        self._ids = torch.empty(64, dtype=torch.long)
        self._vals = torch.zeros(64, dtype=torch.float64)

    def __len__(self) -> int:
        return len(self._slots)

    @property
    def ids(self) -> torch.Tensor:
        return self._ids[: len(self._slots)]

    @property
    def values(self) -> torch.Tensor:
        return self._vals[: len(self._slots)]

    def add(self, token_id: int, amount: float) -> None:
        slot = self._slots.get(token_id)
        if slot is None:
            slot = len(self._slots)
            if slot == self._ids.shape[0]:
                self._ids = torch.cat([self._ids, torch.empty_like(self._ids)])
                self._vals = torch.cat([self._vals, torch.zeros_like(self._vals)])
            self._slots[token_id] = slot
            self._ids[slot] = token_id
        if amount:
            self._vals[slot] += amount

    def scale(self, factor: float) -> None:
        self.values.mul_(factor)

    def as_dict(self) -> dict[int, float]:
        return dict(zip(self.ids.tolist(), self.values.tolist(), strict=True))
