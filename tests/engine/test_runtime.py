"""Which backend the server builds for which checkpoint and setting."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from rwkv_gateway.engine import runtime
from rwkv_gateway.engine.backend_batched_v7 import BatchedRwkv7Backend
from rwkv_gateway.engine.backend_rwkv import RwkvPackageBackend
from rwkv_gateway.errors import ModelLoadError
from rwkv_gateway.settings import Settings


@pytest.mark.parametrize(
    ("fixture", "choice", "expected"),
    [
        ("v7_path", "auto", BatchedRwkv7Backend),
        ("v7_path", "package", RwkvPackageBackend),
        ("v4_path", "auto", RwkvPackageBackend),
    ],
)
def test_backend_choice(
    request: pytest.FixtureRequest, tmp_path: Path, fixture: str, choice: str, expected: type
) -> None:
    path: Path = request.getfixturevalue(fixture)
    loaded = runtime.load(Settings(model=path, data_dir=tmp_path, backend=choice))  # type: ignore[arg-type]
    assert isinstance(loaded.backend, expected)


def test_batched_backend_refuses_older_versions(tmp_path: Path, v4_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="RWKV-7 only"):
        runtime.load(Settings(model=v4_path, data_dir=tmp_path, backend="batched"))


@pytest.mark.parametrize("kernels", [True, False])
def test_cuda_kernels_on_the_batched_backend_are_a_warning(
    tmp_path: Path, v7_path: Path, kernels: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="rwkv_gateway.engine.runtime")
    loaded = runtime.load(Settings(model=v7_path, data_dir=tmp_path, cuda_kernels=kernels))
    assert isinstance(loaded.backend, BatchedRwkv7Backend)
    warned = [
        (r.levelno, r.getMessage()) for r in caplog.records if "RWKV_GATEWAY_CUDA_KERNELS" in r.getMessage()
    ]
    assert warned == ([(logging.WARNING, runtime.CUDA_KERNELS_UNUSED)] if kernels else [])
    # Nothing tried to build the rwkv package's kernels.
    assert os.environ.get("RWKV_CUDA_ON") != "1"
