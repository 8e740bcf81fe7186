"""The Task API's storage port: `StoredTask` (what is kept of a persistent task), the repository of
them and `TaskUnit`, the unit of work the task services open on their `Storage`.

`db/task_repo.py` implements the repository and `db/repo.py`'s unit of work carries it; the task
services see only these protocols (docs/architecture.md#layers). The snapshot itself is not stored
here: `state_key` names it in the engine's state store.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from rwkv_gateway.domain.storage import UnitOfWork


@dataclass(slots=True)
class StoredTask:
    """A persistent task as stored: its text split into pieces by `piece_ends` (offsets into
    `result`), its generation parameters as JSON, and the snapshot key plus the `pending_tokens`
    that snapshot does not hold yet."""

    task_id: str
    kind: str
    params: str
    state_key: str | None
    pending_tokens: list[int]
    result: str
    piece_ends: list[int]
    prefill_time: float
    gen_time: float
    generated_tokens: int
    error: str | None


class TaskRepository(Protocol):
    """Persistent tasks and templates, by task id."""

    async def get(self, task_id: str) -> StoredTask | None: ...

    async def save(self, task: StoredTask) -> None:
        """Insert the task or replace what is stored of it."""
        ...

    async def delete(self, task_id: str) -> bool:
        """Remove the task; False when there was none."""
        ...

    async def count(self) -> int: ...

    async def recent_ids(self, limit: int) -> list[str]:
        """Ids of stored tasks, the most recently saved first."""
        ...


class TaskUnit(UnitOfWork, Protocol):
    """What one transaction of the task services reaches."""

    @property
    def tasks(self) -> TaskRepository: ...
