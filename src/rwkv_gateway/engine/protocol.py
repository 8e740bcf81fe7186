"""The model backend interface: what the scheduler drives from its model thread.

`Backend` is batch-shaped: the `rwkv` package loop backend implements it today, a batched RWKV-7
backend later. What the layers above see of the engine (`Engine`, `TokenStream`, `ModelInfo`) lives in
`domain/engine.py`.
"""

from __future__ import annotations

from typing import Protocol

import torch

from rwkv_gateway.domain.engine import ModelInfo
from rwkv_gateway.engine.snapshot import StateSnapshot

#: A live RNN state in the `rwkv` package's layout (a list of per-layer tensors). Mutable; owned by
#: exactly one sequence at a time.
LiveState = list[torch.Tensor]


class Backend(Protocol):
    """A model that advances a batch of sequences by one forward call. Runs on the model thread only."""

    info: ModelInfo

    def zero_state(self) -> LiveState: ...

    def forward(
        self, token_lists: list[list[int]], states: list[LiveState | None]
    ) -> tuple[torch.Tensor, list[LiveState]]:
        """Feed each sequence its tokens; return logits [B, V] (float32, after each list's last token)
        and the new states. Input states may be consumed (the `rwkv` package mutates them)."""
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
