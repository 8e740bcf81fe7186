"""The real loader on generated v7 and v4 checkpoints, and its errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rwkv_gateway.engine.backend_rwkv import RwkvPackageBackend
from rwkv_gateway.engine.demo_model import UNSAFE_LOGIT, default_unsafe_ids
from rwkv_gateway.engine.loader import detect_version, inspect_checkpoint, load_model, preflight
from rwkv_gateway.engine.tokenizer import Tokenizer
from rwkv_gateway.errors import ModelLoadError


@pytest.mark.parametrize(("fixture", "version"), [("v7_backend", "7"), ("v4_backend", "4")])
def test_loads_generated_checkpoints(request: pytest.FixtureRequest, fixture: str, version: str) -> None:
    backend: RwkvPackageBackend = request.getfixturevalue(fixture)
    info = backend.info
    assert info.version == version
    assert (info.n_layer, info.n_embd, info.vocab_size) == (2, 128, 65536)
    assert info.device == "cpu" and info.dtype == "fp32"
    assert len(info.model_id) == 16
    logits, states = backend.forward([[1, 2, 3]], [None])
    assert logits.shape == (1, 65536) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    assert len(states[0]) == (5 if version == "4" else 3) * 2


@pytest.mark.parametrize("fixture", ["v7_backend", "v4_backend"])
def test_batched_loop_matches_the_package(request: pytest.FixtureRequest, fixture: str) -> None:
    backend: RwkvPackageBackend = request.getfixturevalue(fixture)
    prompts = [[10, 20, 30, 40], [5], [300, 301, 302, 303, 304, 305, 306]]
    logits, _ = backend.forward(prompts, [None, None, None])
    for row, prompt in zip(logits, prompts, strict=True):
        direct, _ = backend.model.forward(list(prompt), None)
        torch.testing.assert_close(row, direct.float(), rtol=0, atol=0)


def test_greedy_generation_is_deterministic(v7_backend: RwkvPackageBackend) -> None:
    def greedy(n: int) -> list[int]:
        logits, states = v7_backend.forward([[100, 200, 300]], [None])
        out: list[int] = []
        for _ in range(n):
            tok = int(torch.argmax(logits[0]))
            out.append(tok)
            logits, states = v7_backend.forward([[tok]], [states[0]])
        return out

    first = greedy(12)
    assert first == greedy(12)
    assert len(set(first)) > 1  # a real forward, not a constant


def test_demo_model_pins_unsafe_tokens(v7_backend: RwkvPackageBackend, tokenizer: Tokenizer) -> None:
    unsafe = default_unsafe_ids()
    assert 0 in unsafe and len(unsafe) > 400
    ids = tokenizer.encode("Hello, 世界! How are you?")
    logits, _ = v7_backend.forward([ids], [None])
    row = logits[0]
    pinned = row[torch.tensor(unsafe)]
    torch.testing.assert_close(pinned, torch.full_like(pinned, UNSAFE_LOGIT), atol=0.5, rtol=0)
    safe_mask = torch.ones_like(row, dtype=torch.bool)
    safe_mask[torch.tensor(unsafe)] = False
    assert row[safe_mask].min() > UNSAFE_LOGIT + 100


def test_detect_version_rules() -> None:
    base: dict[str, tuple[int, ...]] = {"emb.weight": (10, 4), "blocks.0.ln1.weight": (4,)}
    assert detect_version({**base, "blocks.0.att.r_k": (1, 4)}) == "7"
    assert detect_version({**base, "blocks.0.att.time_maa_x": (1, 1, 4)}) == "6"
    assert (
        detect_version({**base, "blocks.0.att.gate.weight": (4, 4), "blocks.0.att.time_decay": (2, 2)})
        == "5.2"
    )
    assert (
        detect_version({**base, "blocks.0.att.gate.weight": (4, 4), "blocks.0.att.time_decay": (2,)}) == "5.1"
    )
    assert detect_version({**base, "blocks.0.att.ln_x.weight": (4,)}) == "5"
    assert detect_version({**base, "blocks.0.att.time_mix_k": (1, 1, 4)}) == "4"
    with pytest.raises(ModelLoadError, match="not an RWKV checkpoint"):
        detect_version({"fc.weight": (3, 3)})
    with pytest.raises(ModelLoadError, match="unrecognised"):
        detect_version(base)


def test_errors_are_one_clear_line(tmp_path: Path, v7_path: Path, v4_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="model file not found") as missing:
        inspect_checkpoint(tmp_path / "nope.pth")
    assert "\n" not in missing.value.message
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(ModelLoadError, match="not a PyTorch checkpoint") as bad:
        inspect_checkpoint(garbage)
    assert "\n" not in bad.value.message
    other = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, other)
    with pytest.raises(ModelLoadError, match="not an RWKV checkpoint"):
        inspect_checkpoint(other)
    listed = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], listed)
    with pytest.raises(ModelLoadError, match="dict of tensors"):
        inspect_checkpoint(listed)
    with pytest.raises(ModelLoadError, match="invalid strategy"):
        preflight(v7_path, "gpu fp64")
    with pytest.raises(ModelLoadError, match="RWKV-7"):
        preflight(v7_path, "cpu fp32 -> cpu fp16")
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="needs CUDA"):
            preflight(v4_path, "cuda fp16")
    with pytest.raises(ModelLoadError, match="model file not found"):
        load_model(tmp_path / "missing.pth")


def test_fingerprint_distinguishes_models(v7_path: Path, v4_path: Path) -> None:
    a, b = inspect_checkpoint(v7_path), inspect_checkpoint(v4_path)
    assert a.model_id != b.model_id
    assert a.model_id == inspect_checkpoint(v7_path).model_id
