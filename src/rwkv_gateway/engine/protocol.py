"""The model backend interface: what the scheduler drives from its model thread.

`Backend` is batch-shaped. Two backends implement it: the batched RWKV-7 backend
(`backend_batched_v7.py`, a step's rows batched by length) and the `rwkv` package backend
(`backend_rwkv.py`, any version, one row after another). What the layers above see of the engine
(`Engine`, `TokenStream`, `ModelInfo`) lives in `domain/engine.py`.
"""

from __future__ import annotations

from typing import Protocol

import torch

from rwkv_gateway.domain.engine import ModelInfo
from rwkv_gateway.engine.snapshot import StateSnapshot

#: A live RNN state in the `rwkv` package's layout (a list of per-layer tensors). Mutable; owned by
#: exactly one sequence at a time.
LiveState = list[torch.Tensor]


class StatesConsumed(Exception):
    """A forward failed after it had already overwritten the input states of `rows` (indices into the
    batch it was given): those sequences cannot be fed again; every other row's state is intact."""

    def __init__(self, rows: frozenset[int], cause: BaseException) -> None:
        super().__init__(f"forward failed after overwriting {len(rows)} input states: {cause!r}")
        self.rows = rows


class Backend(Protocol):
    """A model that advances a batch of sequences by one forward call. Runs on the model thread only."""

    info: ModelInfo

    def zero_state(self) -> LiveState: ...

    def forward(
        self, token_lists: list[list[int]], states: list[LiveState | None], *, overwrite: bool = False
    ) -> tuple[torch.Tensor, list[LiveState]]:
        """Feed each sequence its tokens; return logits [B, V] (float32, after each list's last token)
        and the new states. With `overwrite` the caller gives the input states up: the backend may
        write the new states into them (the `rwkv` package always does). A failure after any input
        state was written raises `StatesConsumed` naming those rows."""
        ...

    def capture(
        self, state: LiveState, token_count: int, logits: torch.Tensor | None = None
    ) -> StateSnapshot:
        """A snapshot (copy) of a live state, with the logits after its last token."""
        ...

    def restore(self, snap: StateSnapshot) -> LiveState:
        """A fresh live state from a snapshot of this model (StateMismatch otherwise)."""
        ...

    def embedding(self, state: LiveState) -> list[float]:
        """The L2-normalised last-layer hidden vector the state keeps for its last token."""
        ...
