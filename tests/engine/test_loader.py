"""The real loader on generated v7 and v4 checkpoints, and its errors."""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from importlib.machinery import ModuleSpec
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.utils.cpp_extension

from rwkv_gateway.engine import loader
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


# -------------------------------------------------------------------------- RWKV_CUDA_ON import


@pytest.fixture
def flags(monkeypatch: pytest.MonkeyPatch) -> dict[str, str | None]:
    """The package's flags before the test (put back after it); RWKV_CUDA_ON starts unset."""
    monkeypatch.delenv("RWKV_CUDA_ON", raising=False)
    for flag in ("RWKV_V7_ON", "RWKV_JIT_ON"):
        monkeypatch.setenv(flag, "0")
    return {flag: os.environ.get(flag) for flag in ("RWKV_V7_ON", "RWKV_JIT_ON", "RWKV_CUDA_ON")}


def no_nvcc(monkeypatch: pytest.MonkeyPatch) -> None:
    """Kernel builds fail as they do without a CUDA toolkit, on any machine."""

    def load(*_args: object, **_kwargs: object) -> None:
        raise OSError("CUDA_HOME environment variable is not set (simulated)")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", load)


def test_a_failed_kernel_build_falls_back_with_warnings(
    monkeypatch: pytest.MonkeyPatch, flags: dict[str, str | None], caplog: pytest.LogCaptureFixture
) -> None:
    no_nvcc(monkeypatch)
    caplog.set_level(logging.DEBUG, logger="rwkv_gateway.engine.loader")
    module = loader.import_rwkv_model(v7=True, jit=True, cuda=True)
    assert module is loader.import_rwkv_model(v7=True, jit=True, cuda=False)
    # The flag describes the module in use, which has no kernels.
    assert os.environ["RWKV_CUDA_ON"] == "0"
    assert "rwkv_gateway._rwkv_model_111" not in sys.modules
    assert (True, True, True) not in loader._MODULES
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    # The package's own notice (it tried without cuBLAS first), then ours naming the setting.
    assert any("falling back to torch.matmul" in m for m in warnings), warnings
    assert any(m.startswith("RWKV_GATEWAY_CUDA_KERNELS") and "simulated" in m for m in warnings), warnings


def test_a_failed_import_puts_the_flags_back(
    monkeypatch: pytest.MonkeyPatch, flags: dict[str, str | None], tmp_path: Path
) -> None:
    broken = tmp_path / "model.py"
    broken.write_text("raise ImportError('no CUDA here (simulated)')\n")
    find_spec = importlib.util.find_spec

    def fake_find_spec(name: str, *args: Any) -> ModuleSpec | None:
        if name == "rwkv.model":
            return importlib.util.spec_from_file_location(name, broken)
        return find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec)
    monkeypatch.setattr(loader, "_MODULES", {})
    with pytest.raises(ModelLoadError, match="no CUDA here"):
        loader.import_rwkv_model(v7=True, jit=True, cuda=True)
    assert {flag: os.environ.get(flag) for flag in flags} == flags
    assert loader._MODULES == {}


def test_the_package_notices_are_warnings(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="rwkv_gateway.engine.loader")
    printed = [
        "Emitting ninja build file /data/torch-extensions/wkv_cuda/build.ninja...",
        "Failed to build cuBLAS matmul, falling back to torch.matmul. Small model with fp16 will overflow.",
        "Note: You are running out of RAM. Get more CPU RAM. Now this will run much slower.",
    ]
    with loader._package_output():
        for line in printed:
            sys.stdout.write(line + "\n")  # what the package's print calls do
    levels = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert levels == [
        (logging.DEBUG, f"rwkv: {printed[0]}"),
        (logging.WARNING, f"rwkv: {printed[1]}"),
        (logging.WARNING, f"rwkv: {printed[2]}"),
    ]
