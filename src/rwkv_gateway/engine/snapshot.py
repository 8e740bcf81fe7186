"""Immutable RNN state snapshots: one flat buffer plus the layout needed to rebuild a live state.

The `rwkv` package keeps a state as a list of per-layer tensors and mutates it in place, so a
snapshot never shares storage with a live state: `capture` copies in, `restore` copies out. The
buffer is one flat float32 tensor (the package's fp16/bf16 token-shift rows widen losslessly), which
also makes a snapshot one contiguous write on disk (see `states.py`).

Snapshots live in host memory whatever device the model runs on: prefix checkpoints, role-play and
task states are kept by the thousand (`StateStore`'s budget), and on a GPU they would take memory
the batch needs. Capturing a GPU state is one concatenation on the device and one non-blocking copy
into pinned memory (state and logits together); restoring is one non-blocking copy back, after which
every tensor is a view of that copy or a cast of one. The model thread queues both copies without
waiting for them; whoever reads a snapshot's buffers on the host waits for the capture's copy first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from rwkv_gateway.errors import StateMismatch

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def dtype_name(dtype: torch.dtype) -> str:
    for name, value in _DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"unsupported state dtype {dtype}")


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise StateMismatch(f"unsupported state dtype {name!r}") from None


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@dataclass(frozen=True, slots=True)
class StateLayout:
    """Shapes and dtypes of a live state's tensors, in order."""

    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]

    @property
    def numel(self) -> int:
        return sum(_numel(shape) for shape in self.shapes)

    def to_json(self) -> dict[str, list[list[int]] | list[str]]:
        return {"shapes": [list(s) for s in self.shapes], "dtypes": list(self.dtypes)}

    @classmethod
    def from_json(cls, data: dict[str, object]) -> StateLayout:
        shapes = data.get("shapes")
        dtypes = data.get("dtypes")
        if not isinstance(shapes, list) or not isinstance(dtypes, list) or len(shapes) != len(dtypes):
            raise StateMismatch("snapshot layout is malformed")
        return cls(tuple(tuple(int(d) for d in s) for s in shapes), tuple(str(d) for d in dtypes))

    @classmethod
    def of(cls, state: list[torch.Tensor]) -> StateLayout:
        return cls(tuple(tuple(t.shape) for t in state), tuple(dtype_name(t.dtype) for t in state))


def _to_host(tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Event | None]:
    """`tensors` flattened, widened to float32 and concatenated into one new host buffer, and the
    event that marks the end of its copy (None when the buffer is complete on return).

    The concatenation runs where the tensors are, so a GPU state comes over in one copy instead of
    one per tensor. From a CUDA device that copy goes into pinned memory (asking for pinned memory
    fails where there is no CUDA) and is not waited for: the model thread goes on queueing work.
    """
    pieces = [t.detach().reshape(-1).to(torch.float32) for t in tensors]
    if len({p.device for p in pieces}) > 1:
        # Layers split over devices (a v4-v6 strategy such as "cuda fp16 *10 -> cpu fp32").
        pieces = [p.to("cpu") for p in pieces]
    flat = torch.cat(pieces)  # always a new tensor: never shares storage with a live state
    if flat.device.type == "cpu":
        return flat, None
    cuda = flat.device.type == "cuda"
    host = torch.empty(flat.shape, dtype=torch.float32, device="cpu", pin_memory=cuda)
    host.copy_(flat, non_blocking=cuda)
    if not cuda:
        return host, None
    # The source is freed when this returns; CUDA's caching allocator only hands its memory to work
    # queued after the copy on this stream, so the copy still reads the right bytes.
    copied = torch.Event(device=flat.device)
    copied.record()  # on the device's current stream, the one the copy went to
    return host, copied


def _held_bytes(flat: torch.Tensor, logits: torch.Tensor | None) -> int:
    """Bytes a snapshot's buffers hold. torch's pinned-memory allocator rounds each block up to a
    power of two (and `capture` allocates one block for both), so a pinned snapshot counts its block."""
    n = flat.numel() * flat.element_size()
    if logits is not None:
        n += logits.numel() * logits.element_size()
    if flat.device.type == "cpu" and flat.is_pinned():
        return 1 << max(0, n - 1).bit_length()
    return int(n)


@dataclass(frozen=True, slots=True, eq=False, init=False)
class StateSnapshot:
    """A frozen RNN state: the result of feeding `token_count` tokens to model `model_id`."""

    _flat: torch.Tensor
    layout: StateLayout
    model_id: str
    version: str
    token_count: int
    _logits: torch.Tensor | None
    #: Set when `capture` copied from a CUDA device without waiting: the buffers are complete once
    #: this event is (see `_wait`).
    _copied: torch.Event | None = field(repr=False)
    _nbytes: int = field(repr=False)

    def __init__(
        self,
        flat: torch.Tensor,
        layout: StateLayout,
        model_id: str,
        version: str,
        token_count: int,
        logits: torch.Tensor | None = None,
        *,
        copied: torch.Event | None = None,
    ) -> None:
        object.__setattr__(self, "_flat", flat)
        object.__setattr__(self, "layout", layout)
        object.__setattr__(self, "model_id", model_id)
        object.__setattr__(self, "version", version)
        object.__setattr__(self, "token_count", token_count)
        object.__setattr__(self, "_logits", logits)
        object.__setattr__(self, "_copied", copied)
        object.__setattr__(self, "_nbytes", _held_bytes(flat, logits))

    @property
    def flat(self) -> torch.Tensor:
        """The state buffer (float32), complete: reading it waits for the capture's copy."""
        self._wait()
        return self._flat

    @property
    def logits(self) -> torch.Tensor | None:
        """The logits after the last token fed (float32 [V]), so generation can start from the snapshot
        without feeding anything (regenerate, continue). None for snapshots that only seed a prompt."""
        self._wait()
        return self._logits

    @property
    def device(self) -> torch.device:
        return self._flat.device

    @property
    def nbytes(self) -> int:
        """Memory the snapshot holds (what `StateStore`'s budget counts)."""
        return self._nbytes

    def _wait(self) -> None:
        if self._copied is not None:
            self._copied.synchronize()

    @classmethod
    def capture(
        cls,
        state: list[torch.Tensor],
        *,
        model_id: str,
        version: str,
        token_count: int,
        logits: torch.Tensor | None = None,
    ) -> StateSnapshot:
        """A host-memory copy of `state` (and of `logits`), whatever device they are on."""
        layout = StateLayout.of(state)
        host, copied = _to_host([*state, *(() if logits is None else (logits,))])
        n = layout.numel
        kept = None if logits is None else host[n:]
        return cls(host[:n], layout, model_id, version, token_count, kept, copied=copied)

    def to_host(self) -> StateSnapshot:
        """This snapshot if it is in host memory, else a host copy (`load_snapshot` can put one on a
        device)."""
        if self._flat.device.type == "cpu":
            return self
        logits = self._logits
        host, copied = _to_host([self._flat, *(() if logits is None else (logits,))])
        n = self._flat.numel()
        kept = None if logits is None else host[n:]
        return StateSnapshot(
            host[:n], self.layout, self.model_id, self.version, self.token_count, kept, copied=copied
        )

    def tensors(self) -> list[torch.Tensor]:
        """The state's tensors as float32 views of the buffer, in layout order. Read only: snapshots
        are shared and immutable."""
        return self._split(self.flat)

    def _split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        offset = 0
        for shape in self.layout.shapes:
            n = _numel(shape)
            out.append(flat[offset : offset + n].view(shape))
            offset += n
        return out

    def restore(
        self, device: torch.device | str | None = None, dtypes: Sequence[torch.dtype] | None = None
    ) -> list[torch.Tensor]:
        """A fresh live state on `device` (default: where the snapshot lives), each tensor in its
        `dtypes` entry (default: the captured dtypes), sharing no memory with the snapshot.

        The buffer goes over in one copy (non-blocking: from pinned memory it overlaps with queued
        work); each float32 tensor is then a view of that copy, the others a cast of one.
        """
        target = self._flat.device if device is None else torch.device(device)
        if dtypes is None:
            dtypes = [dtype_from_name(d) for d in self.layout.dtypes]
        if len(dtypes) != len(self.layout.shapes):
            raise StateMismatch("state snapshot holds a different number of tensors")
        if self._copied is not None and target.type == "cuda":
            # The device waits for the capture's copy, not the host.
            torch.cuda.current_stream(target).wait_event(self._copied)
        else:
            self._wait()
        flat = self._flat.to(target, non_blocking=True, copy=True)
        return [t if t.dtype == dt else t.to(dt) for t, dt in zip(self._split(flat), dtypes, strict=True)]

    def check_model(self, model_id: str) -> None:
        if self.model_id != model_id:
            raise StateMismatch(
                f"state snapshot was made by model {self.model_id}, not the loaded model {model_id}"
            )
