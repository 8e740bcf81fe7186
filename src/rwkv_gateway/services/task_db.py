"""The database side of the Task API: `TaskDatabase` keeps `StoredTask`s in the `tasks` table.

Kept apart from `services.tasks` so the dialect, which imports that module, never depends on the
database layer; the composition root hands a `TaskDatabase` to the `TaskService`. Each call is one
short transaction.
"""

from __future__ import annotations

import json

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from rwkv_gateway.db.models import TaskRecord
from rwkv_gateway.db.task_repo import TaskRepo
from rwkv_gateway.services.tasks import StoredTask


def _stored(row: TaskRecord) -> StoredTask:
    return StoredTask(
        task_id=row.task_id,
        kind=row.kind,
        params=row.params,
        state_key=row.state_key,
        pending_tokens=[int(t) for t in json.loads(row.pending_tokens)],
        result=row.result,
        piece_ends=[int(e) for e in json.loads(row.piece_ends)],
        prefill_time=row.prefill_time,
        gen_time=row.gen_time,
        generated_tokens=row.generated_tokens,
        error=row.error,
    )


class TaskDatabase:
    """`services.tasks.TaskRecords` on the SQLAlchemy session factory."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    async def load(self, task_id: str) -> StoredTask | None:
        async with self._sessions() as session:
            row = await TaskRepo(session).get(task_id)
            return None if row is None else _stored(row)

    async def save(self, row: StoredTask) -> None:
        async with self._sessions() as session:
            await TaskRepo(session).save(
                row.task_id,
                kind=row.kind,
                params=row.params,
                state_key=row.state_key,
                pending_tokens=json.dumps(row.pending_tokens),
                result=row.result,
                piece_ends=json.dumps(row.piece_ends),
                prefill_time=row.prefill_time,
                gen_time=row.gen_time,
                generated_tokens=row.generated_tokens,
                error=row.error,
            )
            await session.commit()

    async def delete(self, task_id: str) -> None:
        async with self._sessions() as session:
            await TaskRepo(session).delete(task_id)
            await session.commit()

    async def count(self) -> int:
        async with self._sessions() as session:
            return await TaskRepo(session).count()

    async def recent_ids(self, limit: int) -> list[str]:
        async with self._sessions() as session:
            return list(await TaskRepo(session).recent_ids(limit))
