"""Interfaces of the engine: what dialects and services call, and what a model backend provides.

`Engine` is the only thing above the engine that services and routers see. `Backend` is the
batch-shaped model interface the scheduler drives from its model thread; the `rwkv` package loop
backend implements it today, a batched RWKV-7 backend later.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from rwkv_gateway.domain.types import GenerationRequest, TokenEvent

#: A live RNN state in the `rwkv` package's layout (a list of per-layer tensors). Mutable; owned by
#: exactly one sequence at a time.
LiveState = list[torch.Tensor]


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """Identity and shape of the loaded model (shown on /readyz, stamped on state snapshots)."""

    name: str
    path: str
    #: Content fingerprint of the checkpoint; snapshots carry it and are refused by other models.
    model_id: str
    version: str
    n_layer: int
    n_embd: int
    vocab_size: int
    strategy: str
    dtype: str
    device: str
    is_demo: bool = False


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


class TokenStream(Protocol):
    """Events of one admitted request: `TextDelta`s, then exactly one `Finish`."""

    request: GenerationRequest
    prompt_token_count: int

    def __aiter__(self) -> AsyncIterator[TokenEvent]: ...

    def cancel(self) -> None:
        """Stop generating (client gone); the stream then ends with Finish(cancelled)."""
        ...


class Engine(Protocol):
    """What every dialect and service talks to."""

    @property
    def info(self) -> ModelInfo: ...

    async def submit(self, request: GenerationRequest) -> TokenStream:
        """Validate and admit a request. Raises ServerBusy when the queue is full and
        InvalidParameter for bad values, before anything is streamed."""
        ...

    def stats(self) -> dict[str, Any]: ...
