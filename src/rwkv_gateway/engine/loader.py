"""Model loading: recognise an RWKV checkpoint, prepare the `rwkv` package for it, and load it.

The `rwkv` package decides at import time which architecture and kernels it provides (RWKV_V7_ON,
RWKV_JIT_ON, RWKV_CUDA_ON), so the version is read from the checkpoint's keys first (a memory-mapped
load that reads no weights), the flags are set from settings, and only then is `rwkv.model` imported.
Each flag combination gets its own module instance, so a test process can hold a v4 and a v7 model.
Every failure becomes one `ModelLoadError` with a message fit for a single log line, except a failed
build of the package's CUDA kernels: the package then runs without them, after a warning.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import logging
import os
import re
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from rwkv_gateway.domain.engine import ModelInfo
from rwkv_gateway.errors import ModelLoadError
from rwkv_gateway.settings import STRATEGY_RE, V7_STRATEGY_RE

logger = logging.getLogger(__name__)

_IMPORT_LOCK = threading.Lock()
_MODULES: dict[tuple[bool, bool, bool], ModuleType] = {}


@dataclass(frozen=True, slots=True)
class CheckpointInfo:
    path: Path
    version: str
    n_layer: int
    n_embd: int
    vocab_size: int
    model_id: str
    size_bytes: int

    def model_info(
        self, *, name: str | None, strategy: str, device: str, dtype: str, is_demo: bool
    ) -> ModelInfo:
        """The served model's identity (the same for every backend, so their snapshots interoperate)."""
        return ModelInfo(
            name=name or self.path.stem,
            path=str(self.path),
            model_id=self.model_id,
            version=self.version,
            n_layer=self.n_layer,
            n_embd=self.n_embd,
            vocab_size=self.vocab_size,
            strategy=strategy,
            dtype=dtype,
            device=device,
            is_demo=is_demo,
        )


def detect_version(shapes: dict[str, tuple[int, ...]]) -> str:
    """The RWKV architecture version from a checkpoint's keys (the `rwkv` package's own rules, plus v7)."""
    keys = shapes.keys()
    if "emb.weight" not in shapes or not any(k.startswith("blocks.") for k in keys):
        raise ModelLoadError("not an RWKV checkpoint (no emb.weight / blocks.* tensors)")
    if "blocks.0.att.r_k" in shapes or "blocks.0.att.x_r" in shapes:
        return "7"
    if any("time_maa" in k for k in keys):
        return "6"
    if any("gate.weight" in k for k in keys):
        decay = shapes.get("blocks.0.att.time_decay", ())
        return "5.2" if len(decay) > 1 and decay[1] > 1 else "5.1"
    if any("ln_x" in k for k in keys):
        return "5"
    if "blocks.0.att.time_mix_k" in shapes:
        return "4"
    raise ModelLoadError("unrecognised RWKV checkpoint layout (not v4, v5, v6 or v7)")


def _fingerprint(sd: dict[str, Any]) -> str:
    """A content id that is cheap on multi-GB files: the full key/shape list plus a few sampled values."""
    h = hashlib.sha256()
    for key in sorted(sd):
        t = sd[key]
        h.update(f"{key}:{tuple(t.shape)}:{t.dtype};".encode())
    for key in ("emb.weight", "head.weight", "blocks.0.att.key.weight", "ln_out.weight"):
        t = sd.get(key)
        if isinstance(t, torch.Tensor) and t.numel():
            flat = t.reshape(-1)
            sample = torch.cat([flat[:64], flat[-64:]]).to(torch.float32).contiguous()
            h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def inspect_checkpoint(path: Path) -> CheckpointInfo:
    """Read keys, shapes and a fingerprint without loading the weights into memory."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"model file not found: {path}")
    if not path.is_file():
        raise ModelLoadError(f"model path is not a file: {path}")
    try:
        sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as exc:
        raise ModelLoadError(f"{path} is not a PyTorch checkpoint: {str(exc).splitlines()[0]}") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ModelLoadError(f"{path} is not an RWKV checkpoint (expected a dict of tensors)")
    shapes = {str(k): tuple(v.shape) for k, v in sd.items()}
    try:
        version = detect_version(shapes)
    except ModelLoadError as exc:
        raise ModelLoadError(f"{path}: {exc.message}") from None
    n_layer = 1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("blocks."))
    vocab_size, n_embd = shapes["emb.weight"]
    return CheckpointInfo(
        path=path,
        version=version,
        n_layer=n_layer,
        n_embd=n_embd,
        vocab_size=vocab_size,
        model_id=_fingerprint(sd),
        size_bytes=path.stat().st_size,
    )


#: Lines the `rwkv` package prints that an operator must see: it fell back to slower code or one
#: that overflows ("Failed to build cuBLAS matmul, falling back to torch.matmul. Small model with
#: fp16 will overflow.") or is short of memory ("Note: You are running out of RAM. ...").
_NOTICE = re.compile(r"falling back|^\s*note:", re.IGNORECASE)


class _LogWriter(io.TextIOBase):
    """Sends what the `rwkv` package prints to our log, line by line: its progress (and the kernel
    build's output) at debug level, its notices at warning level."""

    def __init__(self) -> None:
        self._buf = ""
        self.dots = 0

    def write(self, s: str) -> int:
        self.dots += s.count(".") if s.strip(".") == "" else 0
        self._buf += s
        while "\n" in self._buf:
            line, self._buf = self._buf.split("\n", 1)
            if line.strip():
                level = logging.WARNING if _NOTICE.search(line) else logging.DEBUG
                logger.log(level, "rwkv: %s", line.rstrip())
        return len(s)


@contextlib.contextmanager
def _package_output() -> Iterator[_LogWriter]:
    writer = _LogWriter()
    with contextlib.redirect_stdout(writer), warnings.catch_warnings():
        # The rwkv package is built on TorchScript, which new torch releases deprecate; that is the
        # package's concern, not something an operator can act on.
        warnings.filterwarnings("ignore", message=r".*torch\.jit\..*deprecated", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.jit.*")
        yield writer


def import_rwkv_model(*, v7: bool, jit: bool, cuda: bool) -> ModuleType:
    """`rwkv.model` imported with the given flags (one module instance per combination).

    With `cuda`, importing builds the package's CUDA kernels, which fails without nvcc, a CUDA
    toolkit or a GPU. Then the package is imported without them, and a warning says so: the
    server still serves, with the package's plain torch code (slower)."""
    with _IMPORT_LOCK:
        spec = importlib.util.find_spec("rwkv.model")
        if spec is None or spec.origin is None:
            raise ModelLoadError("the rwkv package is not installed (pip install rwkv)")
        try:
            return _import_locked(spec.origin, v7=v7, jit=jit, cuda=cuda)
        except ModelLoadError as exc:
            if not cuda:
                raise
            logger.warning(
                "RWKV_GATEWAY_CUDA_KERNELS: the rwkv package's CUDA kernels could not be built (%s); "
                "falling back to its torch code, which is slower",
                exc.message,
            )
        module = _import_locked(spec.origin, v7=v7, jit=jit, cuda=False)
        # The package reads the flag again when it builds and runs a model: it must describe the
        # module in use, which has no kernels (an earlier import may have left it unset or "1").
        os.environ["RWKV_CUDA_ON"] = "0"
        return module


_FLAGS = ("RWKV_V7_ON", "RWKV_JIT_ON", "RWKV_CUDA_ON")


def _import_locked(origin: str, *, v7: bool, jit: bool, cuda: bool) -> ModuleType:
    """The module for one flag combination, from the package's `model.py` at `origin`."""
    key = (v7, jit, cuda)
    if key in _MODULES:
        return _MODULES[key]
    # The package also reads RWKV_JIT_ON / RWKV_CUDA_ON when a model is built and while it runs,
    # so the flags stay set for the life of the process (one model per process in production) --
    # unless the import fails: then they go back to what they were, so no flag claims a module
    # that was never loaded.
    previous = {flag: os.environ.get(flag) for flag in _FLAGS}
    os.environ.update(
        {
            "RWKV_V7_ON": "1" if v7 else "0",
            "RWKV_JIT_ON": "1" if jit else "0",
            "RWKV_CUDA_ON": "1" if cuda else "0",
        }
    )
    name = f"rwkv_gateway._rwkv_model_{int(v7)}{int(jit)}{int(cuda)}"
    try:
        mod_spec = importlib.util.spec_from_file_location(name, origin)
        assert mod_spec is not None and mod_spec.loader is not None
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[name] = module
        with _package_output():
            mod_spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(name, None)
        for flag, value in previous.items():
            if value is None:
                os.environ.pop(flag, None)
            else:
                os.environ[flag] = value
        raise ModelLoadError(f"could not import rwkv.model: {exc}") from None
    _MODULES[key] = module
    return module


def _check_strategy(strategy: str, version: str) -> tuple[str, str]:
    strategy = " ".join(strategy.split())
    if not STRATEGY_RE.match(strategy):
        raise ModelLoadError(f'invalid strategy {strategy!r}: expected e.g. "cpu fp32" or "cuda fp16"')
    if version == "7" and not V7_STRATEGY_RE.match(strategy):
        raise ModelLoadError(
            f'invalid strategy {strategy!r} for an RWKV-7 model: use "<cpu|cuda> <fp32|fp16|bf16>"'
        )
    device, dtype = strategy.split("->")[0].split()[:2]
    if "cuda" in strategy and not torch.cuda.is_available():
        raise ModelLoadError(f"strategy {strategy!r} needs CUDA, but torch sees no CUDA device")
    if "mps" in strategy and not torch.backends.mps.is_available():
        raise ModelLoadError(f"strategy {strategy!r} needs MPS, which is not available")
    return device, dtype


def load_model(
    path: Path,
    strategy: str = "cpu fp32",
    *,
    jit: bool = True,
    cuda_kernels: bool = False,
    name: str | None = None,
    is_demo: bool = False,
) -> Any:
    """Load a checkpoint through the `rwkv` package; returns a `RwkvPackageBackend`."""
    from rwkv_gateway.engine.backend_rwkv import RwkvPackageBackend

    t0 = time.perf_counter()
    info = inspect_checkpoint(path)
    device, dtype = _check_strategy(strategy, info.version)
    if info.version == "7" and path.suffix != ".pth":
        raise ModelLoadError(f"RWKV-7 checkpoints must end in .pth (the rwkv package appends it): {path}")
    logger.info(
        "loading %s: RWKV v%s, %d layers, %d wide, vocabulary %d, %.1f MiB, strategy %r",
        path,
        info.version,
        info.n_layer,
        info.n_embd,
        info.vocab_size,
        info.size_bytes / 2**20,
        strategy,
    )
    module = import_rwkv_model(v7=info.version == "7", jit=jit, cuda=cuda_kernels)
    done = threading.Event()

    def heartbeat() -> None:
        while not done.wait(5.0):
            logger.info("still loading %s (%.0f s)", path.name, time.perf_counter() - t0)

    threading.Thread(target=heartbeat, name="model-load-progress", daemon=True).start()
    try:
        with _package_output():
            if info.version == "7":
                model = module.RWKV_x070(str(path)[: -len(".pth")], " ".join(strategy.split()))
            else:
                model = module.RWKV(str(path), strategy, verbose=True)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"loading {path} failed: {type(exc).__name__}: {exc}") from None
    finally:
        done.set()
    elapsed = time.perf_counter() - t0
    model_info = info.model_info(name=name, strategy=strategy, device=device, dtype=dtype, is_demo=is_demo)
    logger.info("model %s loaded in %.2f s (id %s)", model_info.name, elapsed, model_info.model_id)
    return RwkvPackageBackend(model, model_info, load_seconds=elapsed)


def preflight(path: Path, strategy: str) -> CheckpointInfo:
    """Every check that needs no weights loaded: file, layout, version and strategy (fast, for the CLI)."""
    info = inspect_checkpoint(path)
    _check_strategy(strategy, info.version)
    return info
