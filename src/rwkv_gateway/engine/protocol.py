"""The model backend interface: what the scheduler drives from its model thread.

`Backend` is batch-shaped: the `rwkv` package loop backend implements it today, a batched RWKV-7
backend later. What the layers above see of the engine (`Engine`, `TokenStream`, `ModelInfo`) lives in
`domain/engine.py`.
"""

from __future__ import annotations

from typing import Protocol

import torch

from rwkv_gateway.domain.engine import ModelInfo

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
