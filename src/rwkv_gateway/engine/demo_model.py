"""Random-weight RWKV checkpoints in the exact `.pth` layouts the `rwkv` package loads (v7 and v4).

The server serves one of these when no model is configured, and every test loads them, so the real
loader and forward code always run. With random weights the model would sample the ~490 World tokens
that are not whole UTF-8 on their own (and token 0 / unused ids), which decode to U+FFFD. We pin those
tokens' logits far below the rest without changing any shape or any other logit:

* `ln_out` gets a constant weight `g`, so its output is `g * xhat + b` with `xhat` zero-mean;
* every ordinary head row is made zero-mean, so `b * sum(row)` is 0 and its logit is unchanged;
* every unsafe head row is the constant `c < 0`, so its logit is `g * c * sum(xhat) + b * C * c`
  `= b * C * c`, a large negative number, whatever the input.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import torch

logger = logging.getLogger(__name__)

Arch = Literal["v7", "v4"]
WORLD_VOCAB_SIZE = 65536
#: Logit given to unsafe tokens (about 100 standard deviations below the others).
UNSAFE_LOGIT = -200.0
_LN_OUT_BIAS = 1.0


def _lora_dim(n_embd: int, factor: float) -> int:
    # The RWKV-7 training code sizes its low-rank adapters like this (rounded to 32).
    return max(32, int(round(factor * (n_embd**0.5) / 32) * 32))


def _random(
    g: torch.Generator, n_embd: int
) -> tuple[Callable[..., torch.Tensor], Callable[[], torch.Tensor]]:
    """Normal tensors of a given std, and token-shift mix vectors in [0, 1), all from `g`."""

    def rnd(*shape: int, std: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    def mix() -> torch.Tensor:
        return torch.rand(1, 1, n_embd, generator=g)

    return rnd, mix


def _embedding_and_norms(
    n_layer: int, n_embd: int, vocab: int, g: torch.Generator
) -> dict[str, torch.Tensor]:
    """What every RWKV version shares: the embedding, ln0, and each block's ln1 / ln2."""
    w = {
        "emb.weight": torch.randn(vocab, n_embd, generator=g) * 1e-2,
        "blocks.0.ln0.weight": torch.ones(n_embd),
        "blocks.0.ln0.bias": torch.zeros(n_embd),
    }
    for i in range(n_layer):
        for ln in ("ln1", "ln2"):
            w[f"blocks.{i}.{ln}.weight"] = torch.ones(n_embd)
            w[f"blocks.{i}.{ln}.bias"] = torch.zeros(n_embd)
    return w


def _v7_weights(n_layer: int, n_embd: int, vocab: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    C = n_embd
    head_size = 64
    if C % head_size:
        raise ValueError(f"RWKV-7 needs n_embd divisible by {head_size}, got {C}")
    H = C // head_size
    F = 4 * C
    d_decay, d_aaa, d_mv, d_gate = _lora_dim(C, 1.8), _lora_dim(C, 1.8), _lora_dim(C, 1.3), _lora_dim(C, 0.6)

    rnd, mix = _random(g, C)
    w = _embedding_and_norms(n_layer, C, vocab, g)
    lin = 1.0 / math.sqrt(C)
    for i in range(n_layer):
        p = f"blocks.{i}."
        a = p + "att."
        for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g"):
            w[a + name] = mix()
        w[a + "w0"] = rnd(1, 1, C, std=0.5) - 2.0
        w[a + "w1"] = rnd(C, d_decay, std=0.1)
        w[a + "w2"] = rnd(d_decay, C, std=0.1)
        w[a + "a0"] = rnd(1, 1, C, std=0.5)
        w[a + "a1"] = rnd(C, d_aaa, std=0.1)
        w[a + "a2"] = rnd(d_aaa, C, std=0.1)
        if i > 0:  # the first layer's v_first path has no adapter in real checkpoints
            w[a + "v0"] = rnd(1, 1, C, std=0.5) + 1.0
            w[a + "v1"] = rnd(C, d_mv, std=0.1)
            w[a + "v2"] = rnd(d_mv, C, std=0.1)
        w[a + "g1"] = rnd(C, d_gate, std=0.1)
        w[a + "g2"] = rnd(d_gate, C, std=0.1)
        w[a + "k_k"] = torch.full((1, 1, C), 0.85) + rnd(1, 1, C, std=0.05)
        w[a + "k_a"] = torch.ones(1, 1, C) + rnd(1, 1, C, std=0.05)
        w[a + "r_k"] = rnd(H, head_size, std=0.1)
        for name in ("receptance", "key", "value", "output"):
            w[a + name + ".weight"] = rnd(C, C, std=lin)
        w[a + "ln_x.weight"] = torch.ones(C)
        w[a + "ln_x.bias"] = torch.zeros(C)
        f = p + "ffn."
        w[f + "x_k"] = mix()
        w[f + "key.weight"] = rnd(F, C, std=lin)
        w[f + "value.weight"] = rnd(C, F, std=1.0 / math.sqrt(F))
    return w


def _v4_weights(n_layer: int, n_embd: int, vocab: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    C = n_embd
    F = 4 * C
    rnd, mix = _random(g, C)
    w = _embedding_and_norms(n_layer, C, vocab, g)
    lin = 1.0 / math.sqrt(C)
    for i in range(n_layer):
        p = f"blocks.{i}."
        a = p + "att."
        for name in ("time_mix_k", "time_mix_v", "time_mix_r"):
            w[a + name] = mix()
        w[a + "time_decay"] = rnd(C, std=1.0) - 1.0
        w[a + "time_first"] = rnd(C, std=0.5)
        for name in ("key", "value", "receptance", "output"):
            w[a + name + ".weight"] = rnd(C, C, std=lin)
        f = p + "ffn."
        w[f + "time_mix_k"] = mix()
        w[f + "time_mix_r"] = mix()
        w[f + "key.weight"] = rnd(F, C, std=lin)
        w[f + "receptance.weight"] = rnd(C, C, std=lin)
        w[f + "value.weight"] = rnd(C, F, std=1.0 / math.sqrt(F))
    return w


def _safe_head(
    n_embd: int, vocab: int, unsafe_ids: Sequence[int], g: torch.Generator
) -> dict[str, torch.Tensor]:
    head = torch.randn(vocab, n_embd, generator=g) * (2.0 / math.sqrt(n_embd))
    head -= head.mean(dim=1, keepdim=True)
    if unsafe_ids:
        c = UNSAFE_LOGIT / (_LN_OUT_BIAS * n_embd)
        head[torch.tensor(sorted(set(unsafe_ids)), dtype=torch.long)] = c
    return {
        "ln_out.weight": torch.ones(n_embd),
        "ln_out.bias": torch.full((n_embd,), _LN_OUT_BIAS),
        "head.weight": head,
    }


def default_unsafe_ids(vocab_size: int = WORLD_VOCAB_SIZE) -> list[int]:
    """Token ids of the World vocabulary that cannot be decoded on their own (and id 0, unused ids)."""
    from rwkv_gateway.engine.tokenizer import load_tokenizer, unsafe_token_ids

    tok = load_tokenizer(None, vocab_size)
    return [i for i in unsafe_token_ids(tok) if i < vocab_size]


def make_demo_weights(
    arch: Arch = "v7",
    *,
    n_layer: int = 2,
    n_embd: int = 128,
    vocab_size: int = WORLD_VOCAB_SIZE,
    seed: int = 0,
    unsafe_ids: Sequence[int] | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> dict[str, torch.Tensor]:
    """The state dict of a random-weight model (bf16 by default, like released checkpoints)."""
    if n_layer < 1 or n_embd < 1 or vocab_size < 2:
        raise ValueError("n_layer, n_embd and vocab_size must be positive")
    if arch not in ("v7", "v4"):
        raise ValueError(f"unknown architecture {arch!r} (expected v7 or v4)")
    g = torch.Generator().manual_seed(seed)
    builder = _v7_weights if arch == "v7" else _v4_weights
    weights = builder(n_layer, n_embd, vocab_size, g)
    ids = default_unsafe_ids(vocab_size) if unsafe_ids is None else list(unsafe_ids)
    weights.update(_safe_head(n_embd, vocab_size, ids, g))
    return {k: v.to(dtype).contiguous() for k, v in weights.items()}


def write_demo_model(
    path: Path,
    arch: Arch = "v7",
    *,
    n_layer: int = 2,
    n_embd: int = 128,
    vocab_size: int = WORLD_VOCAB_SIZE,
    seed: int = 0,
    unsafe_ids: Sequence[int] | None = None,
) -> Path:
    """Write a checkpoint atomically (a crash never leaves a half-written .pth that would be served)."""
    path = Path(path)
    if path.suffix != ".pth":
        raise ValueError(f"checkpoint path must end in .pth: {path}")
    weights = make_demo_weights(
        arch, n_layer=n_layer, n_embd=n_embd, vocab_size=vocab_size, seed=seed, unsafe_ids=unsafe_ids
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(weights, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    logger.info(
        "wrote random-weight RWKV %s checkpoint %s (%d layers, %d wide, seed %d)",
        arch,
        path,
        n_layer,
        n_embd,
        seed,
    )
    return path
