"""Immutable RNN state snapshots: one flat buffer plus the layout needed to rebuild a live state.

The `rwkv` package keeps a state as a list of per-layer tensors and mutates it in place, so a
snapshot never shares storage with a live state: `capture` copies in, `restore` copies out. The
buffer is one flat float32 tensor (the package's fp16/bf16 token-shift rows widen losslessly), which
also makes a snapshot one contiguous write on disk (see `states.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True, slots=True)
class StateLayout:
    """Shapes and dtypes of a live state's tensors, in order."""

    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]

    @property
    def numel(self) -> int:
        total = 0
        for shape in self.shapes:
            n = 1
            for d in shape:
                n *= d
            total += n
        return total

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


@dataclass(frozen=True, slots=True, eq=False)
class StateSnapshot:
    """A frozen RNN state: the result of feeding `token_count` tokens to model `model_id`."""

    flat: torch.Tensor
    layout: StateLayout
    model_id: str
    version: str
    token_count: int
    #: The logits after the last token fed (float32 [V]), so generation can start from the snapshot
    #: without feeding anything (regenerate, continue). None for snapshots that only seed a prompt.
    logits: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        n = self.flat.numel() * self.flat.element_size()
        if self.logits is not None:
            n += self.logits.numel() * self.logits.element_size()
        return int(n)

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
        layout = StateLayout.of(state)
        flat = torch.cat([t.detach().reshape(-1).to(torch.float32) for t in state])
        kept = None if logits is None else logits.detach().reshape(-1).to(torch.float32, copy=True)
        return cls(
            flat=flat, layout=layout, model_id=model_id, version=version, token_count=token_count, logits=kept
        )

    def restore(self, device: torch.device | str | None = None) -> list[torch.Tensor]:
        """A fresh live state (new tensors) on `device` (default: where the snapshot lives)."""
        flat = self.flat if device is None else self.flat.to(device)
        out: list[torch.Tensor] = []
        offset = 0
        for shape, dt in zip(self.layout.shapes, self.layout.dtypes, strict=True):
            n = 1
            for d in shape:
                n *= d
            out.append(flat[offset : offset + n].view(shape).to(dtype_from_name(dt), copy=True))
            offset += n
        return out

    def check_model(self, model_id: str) -> None:
        if self.model_id != model_id:
            raise StateMismatch(
                f"state snapshot was made by model {self.model_id}, not the loaded model {model_id}"
            )
