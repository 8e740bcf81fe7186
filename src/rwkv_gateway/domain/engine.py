"""What the layers above the engine see of it: the Engine and TokenStream protocols, model identity.

Dialects and services depend on these protocols only (never on `rwkv_gateway.engine`), so they stay
free of torch and can be driven by any engine implementation.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from rwkv_gateway.domain.types import Finish, GenerationRequest, Snapshot, TokenEvent


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


class TextCodec(Protocol):
    """The served model's tokenizer, as dialects need it (token counting, /tokenize routes)."""

    name: str
    vocab_size: int
    eos_token_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def token_bytes(self, token_id: int) -> bytes: ...


class SnapshotStore(Protocol):
    """Named state snapshots kept in RAM and (when persisted) on disk. Blocking: call from a thread."""

    def put(self, key: str, snap: Any, *, persist: bool = False) -> None: ...

    def get(self, key: str) -> Any | None: ...

    def delete(self, key: str) -> None: ...

    def forget_cached(self, key: str) -> None: ...


class TokenStream(Protocol):
    """Events of one admitted request: `TextDelta`s, then exactly one `Finish`."""

    request: GenerationRequest
    prompt_token_count: int

    def __aiter__(self) -> AsyncIterator[TokenEvent]: ...

    def cancel(self) -> None:
        """Stop generating (client gone); the stream then ends with Finish(cancelled)."""
        ...

    async def collect(self) -> tuple[str, Finish]:
        """The whole text and the finish event."""
        ...


class Engine(Protocol):
    """What every dialect and service talks to."""

    @property
    def info(self) -> ModelInfo: ...

    @property
    def codec(self) -> TextCodec: ...

    @property
    def snapshots(self) -> SnapshotStore | None: ...

    async def submit(self, request: GenerationRequest) -> TokenStream:
        """Validate and admit a request. Raises ServerBusy when the queue is full and
        InvalidParameter for bad values, before anything is streamed."""
        ...

    async def submit_many(self, requests: Sequence[GenerationRequest]) -> list[TokenStream]:
        """Admit the requests of one client call together (all or none); an idle queue always
        takes the whole group."""
        ...

    async def embed(self, inputs: Sequence[str | Sequence[int]]) -> list[tuple[list[float], int]]:
        """Embedding vector and token count of each text (or token-id list), batched on the engine."""
        ...

    def stats(self) -> dict[str, Any]: ...


__all__ = ["Engine", "ModelInfo", "Snapshot", "SnapshotStore", "TextCodec", "TokenStream"]
