"""The batched RWKV-7 backend: B sequences advance in one plain-torch forward.

This module owns an independent implementation of the RWKV-7 ("Goose") forward pass that works on a
whole batch at once: per layer, one matmul per weight for every decoding row together, and the WKV
state update as a rank-1 correction batched over [B, H, N, N] (for decode steps: written over the
old states when the scheduler gives them up, see `forward`). It reads the same `.pth` checkpoints
the `rwkv` package reads, applies the same weight transforms (`RWKV_x070.__init__`), and keeps live
states in the package's exact layout (per layer: att token-shift row [C], WKV matrix [H, N, N] float32,
ffn token-shift row [C]) with the same `model_id`, so snapshots taken by either backend restore in
the other. The math mirrors `RWKV_x070_TMix_one/_seq` and `RWKV_x070_CMix_one/_seq` of rwkv 0.8.x.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from rwkv_gateway.domain.engine import ModelInfo
from rwkv_gateway.engine.live_state import TemplateStates
from rwkv_gateway.engine.loader import _check_strategy, inspect_checkpoint
from rwkv_gateway.engine.protocol import LiveState, StatesConsumed
from rwkv_gateway.engine.wkv import CHUNKED_FROM, wkv_chunked, wkv_loop, wkv_one
from rwkv_gateway.errors import ModelLoadError

logger = logging.getLogger(__name__)

_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: exp(-0.5): the package's decay scale, `w = exp(-0.606531 * sigmoid(w0 + lora(x)))`.
_DECAY_SCALE = 0.606531
_GROUP_NORM_EPS = 64e-5
#: Low-rank adapters, stored [in, out] in checkpoints (used as `x @ w1`); transposed once at load time
#: so every matrix is [out, in] like the projections and the head.
_LORA_NAMES = ("w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2")
#: From this many rows on, `F.linear` is as fast as W @ x^T (see `_project`).
_LINEAR_ROWS = 64


@dataclass(frozen=True, slots=True)
class _Layer:
    """One block's weights, already in the layouts the batched forward uses (matrices [out, in])."""

    ln1_w: torch.Tensor
    ln1_b: torch.Tensor
    ln2_w: torch.Tensor
    ln2_b: torch.Tensor
    #: x_r, x_w, x_k, x_v, x_a, x_g stacked [6, 1, 1, C]: all six token-shift mixes in one kernel.
    mix: torch.Tensor
    w0: torch.Tensor
    w1: torch.Tensor
    w2: torch.Tensor
    a0: torch.Tensor
    a1: torch.Tensor
    a2: torch.Tensor
    #: None in layer 0, which sets v_first instead of mixing towards it.
    v0: torch.Tensor | None
    v1: torch.Tensor | None
    v2: torch.Tensor | None
    g1: torch.Tensor
    g2: torch.Tensor
    k_k: torch.Tensor
    k_a: torch.Tensor
    r_k: torch.Tensor
    receptance: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    output: torch.Tensor
    ln_x_w: torch.Tensor
    ln_x_b: torch.Tensor
    ffn_x_k: torch.Tensor
    ffn_key: torch.Tensor
    ffn_value: torch.Tensor


class _RowState(list[torch.Tensor]):
    """A live state `forward` returned: row `row` of the batch `batch` (an identity token, one per
    batched result). Its WKV tensor is that row of the batch's WKV tensor of each layer, so states
    with one token and consecutive rows can be advanced in place (see `forward`'s `overwrite`)."""

    __slots__ = ("batch", "row")

    def __init__(self, tensors: list[torch.Tensor], batch: object, row: int) -> None:
        super().__init__(tensors)
        self.batch = batch
        self.row = row


def _rows_of_one_batch(states: Sequence[LiveState]) -> bool:
    """Whether `states` are consecutive rows, in order, of one batched result of `forward`."""
    first = states[0]
    if not isinstance(first, _RowState):
        return False
    return all(
        isinstance(s, _RowState) and s.batch is first.batch and s.row == first.row + j
        for j, s in enumerate(states)
    )


def _batch_rows(rows: Sequence[torch.Tensor]) -> torch.Tensor:
    """Rows as one [B, ...] tensor: a view when they already are consecutive rows of one buffer.

    A decode step hands each sequence views into the previous step's batched WKV tensor, so a batch
    that did not change its order since then needs no copy at all. Anything else is stacked.
    """
    first = rows[0]
    if len(rows) == 1:
        return first.unsqueeze(0)  # read-only below, so a view will do
    if first.is_contiguous():
        step = first.numel() * first.element_size()
        base = first.data_ptr()
        shape, dtype = first.shape, first.dtype
        if all(
            t.data_ptr() == base + j * step and t.shape == shape and t.dtype == dtype and t.is_contiguous()
            for j, t in enumerate(rows)
        ):
            # Live allocations never overlap, so consecutive addresses inside first's storage (which
            # as_strided checks: it refuses a view past the storage's end) are exactly those rows.
            try:
                return first.as_strided((len(rows), *shape), (first.numel(), *first.stride()))
            except RuntimeError:
                pass
    return torch.stack(list(rows))


def _project(x: torch.Tensor, weight: torch.Tensor, transposed_rows: frozenset[int]) -> torch.Tensor:
    """`F.linear(x, weight)` for a large [out, in] weight, or the same product taken as W @ x^T when
    the row count is in `transposed_rows` (CPU fp32 only; see `_calibrate`).

    Which is faster for a handful of rows depends on the processor and its BLAS: on a 2-core AMD EPYC
    (12x768 model, decode tok/s at B=1/2/4/16) `linear` gave 21/24/49/156 and W @ x^T 38/69/102/185; on
    a 2-core AVX-512 Xeon `linear` is twice as fast for one row and W @ x^T only wins around 16 rows.
    One row goes to a slow matrix-vector kernel in W @ x^T, so it is duplicated into two columns.
    """
    x2 = x.reshape(-1, x.shape[-1])
    rows = x2.shape[0]
    if not transposed_rows or _row_bucket(rows) not in transposed_rows:
        return F.linear(x, weight)
    cols = torch.cat((x2, x2)) if rows == 1 else x2
    y = torch.mm(weight, cols.t())[:, :rows].t()
    return y.contiguous().view(*x.shape[:-1], weight.shape[0])


def _shape(weight: torch.Tensor) -> tuple[int, int]:
    return (int(weight.shape[0]), int(weight.shape[1]))


def _row_bucket(rows: int) -> int:
    """The power of two at or above `rows` (the row counts `_calibrate` measures)."""
    return 1 << max(0, rows - 1).bit_length()


#: `_calibrate`'s answers in this process, by matrix shape and intra-op thread count (the timing
#: depends on those, not on the values; a process that loads the same model again skips the timing).
_CALIBRATED: dict[tuple[tuple[int, int], int], frozenset[int]] = {}


def _calibrate(weight: torch.Tensor) -> frozenset[int]:
    """Row counts below `_LINEAR_ROWS` at which W @ x^T beats `F.linear` on this machine by 10% or more,
    timed on one of the model's own projection matrices (best of several tries; about 0.1 s for a
    layer matrix of a 12x768 model, 1-3 s for its head)."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        return frozenset()
    key = (_shape(weight), torch.get_num_threads())
    if key not in _CALIBRATED:
        _CALIBRATED[key] = _measure_forms(weight)
    return _CALIBRATED[key]


def _measure_forms(weight: torch.Tensor) -> frozenset[int]:
    faster: set[int] = set()
    rows = 1
    with torch.inference_mode():
        while rows < _LINEAR_ROWS:
            x = torch.randn(rows, weight.shape[1])
            times = []
            for use in (frozenset(), frozenset({rows})):
                _project(x, weight, use)  # warm-up
                best = math.inf
                for _ in range(5):
                    t0 = time.perf_counter()
                    _project(x, weight, use)
                    best = min(best, time.perf_counter() - t0)
                times.append(best)
            if times[1] < 0.9 * times[0]:
                faster.add(rows)
            rows *= 2
    return frozenset(faster)


class BatchedRwkv7Backend(TemplateStates):
    """Advances many RWKV-7 sequences per forward call (runs on the model thread only).

    The states `forward` returns are views into that call's batched tensors (one per layer and kind),
    which is what lets the next decode step read them without stacking. So a state held while its
    batch-mates move on keeps that step's batch tensor alive until it is fed again or dropped; the
    scheduler feeds or finishes every decoding sequence each step, and `capture` copies.
    """

    def __init__(
        self,
        *,
        info: ModelInfo,
        emb: torch.Tensor,
        layers: list[_Layer],
        ln_out_w: torch.Tensor,
        ln_out_b: torch.Tensor,
        head: torch.Tensor,
        n_head: int,
        head_size: int,
        load_seconds: float = 0.0,
    ) -> None:
        self.info = info
        self.load_seconds = load_seconds
        self.n_head = n_head
        self.head_size = head_size
        self.n_embd = info.n_embd
        self._emb = emb
        self._layers = layers
        self._ln_out_w = ln_out_w
        self._ln_out_b = ln_out_b
        self._head = head
        self.device = emb.device
        self.dtype = emb.dtype
        #: Per matrix shape, the row counts whose projections run as W @ x^T, measured at load time
        #: (see `_project`). Each shape measures its own: the choice differs between the 65536-row head
        #: (one row: W @ x^T 4.2 ms, `linear` 11.3 on a 2-core Xeon, 12x768 model) and the layers.
        matrices = [head]
        for layer in layers:
            matrices += [
                layer.receptance,
                layer.key,
                layer.value,
                layer.output,
                layer.ffn_key,
                layer.ffn_value,
            ]
        self.projection_forms = {_shape(w): _calibrate(w) for w in matrices}
        #: Prompt chunks of this many tokens or more use the chunked WKV form (see `engine/wkv.py`).
        self.wkv_chunk_from = CHUNKED_FROM
        self._set_template(self._make_zero_state())

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(
        cls, path: Path, strategy: str = "cpu fp32", *, name: str | None = None, is_demo: bool = False
    ) -> BatchedRwkv7Backend:
        """Load an RWKV-7 `.pth` checkpoint onto one "device dtype" strategy (like the package's v7)."""
        t0 = time.perf_counter()
        path = Path(path)
        ckpt = inspect_checkpoint(path)
        if ckpt.version != "7":
            raise ModelLoadError(
                f"the batched backend runs RWKV-7 checkpoints only; {path} is RWKV v{ckpt.version}"
            )
        strategy = " ".join(strategy.split())
        device_name, dtype_name = _check_strategy(strategy, ckpt.version)
        device = torch.device(device_name)
        dtype = _DTYPES[dtype_name]
        logger.info(
            "loading %s (batched RWKV-7): %d layers, %d wide, vocabulary %d, %.1f MiB, strategy %r",
            path,
            ckpt.n_layer,
            ckpt.n_embd,
            ckpt.vocab_size,
            ckpt.size_bytes / 2**20,
            strategy,
        )
        info = ckpt.model_info(
            name=name, strategy=strategy, device=device_name, dtype=dtype_name, is_demo=is_demo
        )
        try:
            sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            backend = cls._from_state_dict(sd, info, device, dtype)
        except ModelLoadError:
            raise
        except Exception as exc:
            raise ModelLoadError(f"loading {path} failed: {type(exc).__name__}: {exc}") from None
        backend.load_seconds = time.perf_counter() - t0
        logger.info(
            "model %s loaded in %.2f s (id %s, batched RWKV-7 backend)",
            backend.info.name,
            backend.load_seconds,
            backend.info.model_id,
        )
        return backend

    @classmethod
    def _from_state_dict(
        cls,
        sd: dict[str, torch.Tensor],
        info: ModelInfo,
        device: torch.device,
        dtype: torch.dtype,
    ) -> BatchedRwkv7Backend:
        if any("s_emb" in k for k in sd):
            raise ModelLoadError(f"{info.path}: DeepEmbed RWKV-7 checkpoints are not supported")

        def get(key: str) -> torch.Tensor:
            # The package's transforms (squeeze, flatten r_k, move to the device, then cast, so values
            # round exactly as there), except that the receptance/key/value/output/head weights keep
            # the checkpoint's [out, in] layout: the package transposes them for `x @ W`, but small
            # batches are faster as W @ x^T (see `_project`), and `F.linear` wants [out, in] too.
            tensor = sd[key].squeeze()
            if key.rsplit(".", 1)[-1] in _LORA_NAMES:
                tensor = tensor.t()
            elif key.endswith("att.r_k"):
                tensor = tensor.flatten()
            return tensor.to(device).to(dtype).contiguous()

        n_head, head_size = sd["blocks.0.att.r_k"].shape
        n_embd = info.n_embd
        layers: list[_Layer] = []
        for i in range(info.n_layer):
            att, ffn, blk = f"blocks.{i}.att.", f"blocks.{i}.ffn.", f"blocks.{i}."
            mixes = [get(att + m) for m in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g")]
            has_v = i > 0
            layers.append(
                _Layer(
                    ln1_w=get(blk + "ln1.weight"),
                    ln1_b=get(blk + "ln1.bias"),
                    ln2_w=get(blk + "ln2.weight"),
                    ln2_b=get(blk + "ln2.bias"),
                    mix=torch.stack(mixes).view(6, 1, 1, n_embd),
                    w0=get(att + "w0"),
                    w1=get(att + "w1"),
                    w2=get(att + "w2"),
                    a0=get(att + "a0"),
                    a1=get(att + "a1"),
                    a2=get(att + "a2"),
                    v0=get(att + "v0") if has_v else None,
                    v1=get(att + "v1") if has_v else None,
                    v2=get(att + "v2") if has_v else None,
                    g1=get(att + "g1"),
                    g2=get(att + "g2"),
                    k_k=get(att + "k_k"),
                    k_a=get(att + "k_a"),
                    r_k=get(att + "r_k"),
                    receptance=get(att + "receptance.weight"),
                    key=get(att + "key.weight"),
                    value=get(att + "value.weight"),
                    output=get(att + "output.weight"),
                    ln_x_w=get(att + "ln_x.weight"),
                    ln_x_b=get(att + "ln_x.bias"),
                    ffn_x_k=get(ffn + "x_k"),
                    ffn_key=get(ffn + "key.weight"),
                    ffn_value=get(ffn + "value.weight"),
                )
            )
        # The package folds blocks.0.ln0 into the embedding table once (in the strategy's dtype).
        emb = F.layer_norm(
            get("emb.weight"),
            (n_embd,),
            weight=get("blocks.0.ln0.weight"),
            bias=get("blocks.0.ln0.bias"),
        )
        return cls(
            info=info,
            emb=emb,
            layers=layers,
            ln_out_w=get("ln_out.weight"),
            ln_out_b=get("ln_out.bias"),
            head=get("head.weight"),
            n_head=int(n_head),
            head_size=int(head_size),
        )

    # ------------------------------------------------------------------ states

    def _make_zero_state(self) -> LiveState:
        C, H, N = self.n_embd, self.n_head, self.head_size
        state: LiveState = []
        for _ in range(self.info.n_layer):
            state += [
                torch.zeros(C, dtype=self.dtype, device=self.device),
                torch.zeros((H, N, N), dtype=torch.float32, device=self.device),
                torch.zeros(C, dtype=self.dtype, device=self.device),
            ]
        return state

    # ------------------------------------------------------------------ forward

    def forward(
        self, token_lists: list[list[int]], states: list[LiveState | None], *, overwrite: bool = False
    ) -> tuple[torch.Tensor, list[LiveState]]:
        """Feed each sequence its tokens; rows of equal length share one batched forward.

        Decoding rows (one token each) form one group; prompt chunks of equal length form others.
        Input states are only read, so a failed call leaves every state intact (the scheduler then
        retries row by row) -- except with `overwrite`, where the caller gives the states up: decoding
        rows that are consecutive rows of one earlier result get their new WKV states written over the
        old ones (no allocation, one memory pass less per layer). That group runs last; if it fails,
        `StatesConsumed` names its rows.
        """
        if len(token_lists) != len(states):
            raise ValueError("token_lists and states differ in length")
        # Decoding rows form one group; prompt chunks share groups by length bucket (a power of two),
        # padded to the longest in theirs: at most half of a group's token rows are padding, and prompts
        # of different lengths still run as one forward (see `_forward_group`).
        groups: dict[int, list[int]] = {}
        for row, tokens in enumerate(token_lists):
            if not tokens:
                raise ValueError("every sequence in a batch needs at least one token")
            groups.setdefault(_row_bucket(len(tokens)), []).append(row)
        live = [s if s is not None else self._template for s in states]
        in_place = overwrite and 1 in groups and _rows_of_one_batch([live[r] for r in groups[1]])
        if in_place:
            groups[1] = groups.pop(1)  # last: a failure before it leaves every state intact

        def run(rows: list[int], writes: bool) -> tuple[torch.Tensor, list[LiveState]]:
            try:
                return self._forward_group(
                    [token_lists[r] for r in rows], [live[r] for r in rows], in_place=writes
                )
            except Exception as exc:
                if writes:
                    raise StatesConsumed(frozenset(rows), exc) from exc
                raise

        out_states: list[LiveState] = [[] for _ in token_lists]
        with torch.inference_mode():
            if len(groups) == 1:
                return run(next(iter(groups.values())), in_place)
            logits = torch.empty(
                (len(token_lists), self.info.vocab_size), dtype=torch.float32, device=self.device
            )
            for length, rows in groups.items():
                group_logits, new = run(rows, in_place and length == 1)
                logits[torch.tensor(rows, device=self.device)] = group_logits
                for r, st in zip(rows, new, strict=True):
                    out_states[r] = st
        return logits, out_states

    def _forward_group(
        self, token_lists: Sequence[Sequence[int]], states: Sequence[LiveState], *, in_place: bool = False
    ) -> tuple[torch.Tensor, list[LiveState]]:
        """One forward for B rows of up to T tokens each: logits [B, V] float32 and the B new states.
        With `in_place` (T = 1 only) the new WKV states are written into the batched input view.

        Shorter rows are padded at the end. A padded position leaves the WKV state as it is (decay 1,
        no key, no rank-1 term: `S * 1 + 0 + v 0^T = S`), nothing else carries over between positions
        but the token shift, which reads only earlier positions, and each row's logits and shift
        states are taken at its own last real token.
        """
        B, T = len(token_lists), max(len(t) for t in token_lists)
        C = self.n_embd
        lengths = [len(t) for t in token_lists]
        # Ragged rows: which positions are real tokens [B, T], and each row's last one (row, position).
        valid = last = rows = None
        if min(lengths) != T:
            token_lists = [list(t) + [0] * (T - len(t)) for t in token_lists]
            length = torch.tensor(lengths, device=self.device)
            valid = torch.arange(T, device=self.device) < length.unsqueeze(1)
            last, rows = length - 1, torch.arange(B, device=self.device)
        idx = torch.tensor(token_lists, dtype=torch.long, device=self.device)
        x = F.embedding(idx, self._emb)  # [B, T, C]
        new_layers: list[torch.Tensor] = []
        v_first = x  # replaced by layer 0's v before any use
        for i, layer in enumerate(self._layers):
            xa = F.layer_norm(x, (C,), weight=layer.ln1_w, bias=layer.ln1_b)
            shift = _batch_rows([s[3 * i] for s in states]).to(xa.dtype)
            wkv = _batch_rows([s[3 * i + 1] for s in states]).to(torch.float32)
            out, wkv, v_first = self._time_mix(i, layer, xa, shift, wkv, v_first, in_place, valid)
            x = x + out
            xf = F.layer_norm(x, (C,), weight=layer.ln2_w, bias=layer.ln2_b)
            shift_f = _batch_rows([s[3 * i + 2] for s in states]).to(xf.dtype)
            x = x + self._channel_mix(layer, xf, shift_f)
            # The last token's rows become the next token-shift state. For T > 1 they are copied out so
            # a live state does not keep a whole prompt chunk's activations alive.
            if last is not None:
                last_a, last_f = xa[rows, last], xf[rows, last]  # gathered: new tensors
            else:
                last_a, last_f = xa[:, -1], xf[:, -1]
                if T > 1:
                    last_a, last_f = last_a.contiguous(), last_f.contiguous()
            new_layers += [last_a, wkv, last_f]
        x = x[rows, last] if last is not None else x[:, -1]
        x = F.layer_norm(x, (C,), weight=self._ln_out_w, bias=self._ln_out_b)
        logits = self._project(x, self._head).float()
        # One unbind per state tensor: each sequence gets views of the batched results.
        per_tensor = [t.unbind(0) for t in new_layers]
        batch = object()
        new_states: list[LiveState] = [
            _RowState([rows[b] for rows in per_tensor], batch, b) for b in range(B)
        ]
        return logits, new_states

    def _time_mix(
        self,
        i: int,
        layer: _Layer,
        x: torch.Tensor,
        shift: torch.Tensor,
        wkv: torch.Tensor,
        v_first: torch.Tensor,
        in_place: bool = False,
        valid: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """RWKV_x070_TMix for x [B, T, C], shift [B, C], wkv [B, H, N, N]; returns (out, wkv, v_first).
        `valid` [B, T] marks real tokens of padded rows: padding leaves the WKV state unchanged."""
        B, T, C = x.shape
        H, N = self.n_head, self.head_size
        prev = shift.unsqueeze(1) if T == 1 else torch.cat((shift.unsqueeze(1), x[:, :-1]), dim=1)
        # x + (x_prev - x) * mix for all six mixes at once: [6, B, T, C], each slice contiguous.
        xr, xw, xk, xv, xa, xg = torch.addcmul(x, prev - x, layer.mix).unbind(0)

        r = self._project(xr, layer.receptance)
        w = F.linear(torch.tanh(F.linear(xw, layer.w1)), layer.w2, layer.w0)
        k = self._project(xk, layer.key)
        v = self._project(xv, layer.value)
        a = torch.sigmoid(F.linear(F.linear(xa, layer.a1), layer.a2, layer.a0))
        g = F.linear(torch.sigmoid(F.linear(xg, layer.g1)), layer.g2)

        kk = F.normalize((k * layer.k_k).view(B, T, H, N), dim=-1, p=2.0).view(B, T, C)
        k = k * (1 + (a - 1) * layer.k_a)
        if i == 0:
            v_first = v
        else:
            assert layer.v0 is not None and layer.v1 is not None and layer.v2 is not None
            v = v + (v_first - v) * torch.sigmoid(F.linear(F.linear(xv, layer.v1), layer.v2, layer.v0))
        decay = torch.exp(-_DECAY_SCALE * torch.sigmoid(w.float()))
        if valid is not None:
            keep = valid.unsqueeze(-1)  # [B, T, 1]
            decay = torch.where(keep, decay, 1.0)
            k_wkv, a_wkv = torch.where(keep, k, 0.0), torch.where(keep, a, 0.0)
        else:
            k_wkv, a_wkv = k, a

        if T == 1:
            y, wkv = wkv_one(wkv, r, decay, k, v, kk, a, n_head=H, head_size=N, in_place=in_place)
        elif self.wkv_chunk_from <= T:
            y, wkv = wkv_chunked(wkv, r, decay, k_wkv, v, kk, a_wkv, n_head=H, head_size=N)
        else:
            y, wkv = wkv_loop(wkv, r, decay, k_wkv, v, kk, a_wkv, n_head=H, head_size=N)

        y = F.group_norm(y.to(x.dtype).reshape(B * T, C), H, layer.ln_x_w, layer.ln_x_b, eps=_GROUP_NORM_EPS)
        y = y.view(B, T, C) + (
            (r * k * layer.r_k).view(B, T, H, N).sum(dim=-1, keepdim=True) * v.view(B, T, H, N)
        ).view(B, T, C)
        return self._project(y * g, layer.output), wkv, v_first

    def _project(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return _project(x, weight, self.projection_forms.get(_shape(weight), frozenset()))

    def _channel_mix(self, layer: _Layer, x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """RWKV_x070_CMix for x [B, T, C] and shift [B, C]."""
        T = x.shape[1]
        prev = shift.unsqueeze(1) if T == 1 else torch.cat((shift.unsqueeze(1), x[:, :-1]), dim=1)
        h = self._project(torch.addcmul(x, prev - x, layer.ffn_x_k), layer.ffn_key)
        h = torch.relu_(h).square_()
        return self._project(h, layer.ffn_value)
