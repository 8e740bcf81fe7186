"""RequestLogger against a real migrated database (a SQLite file and PostgreSQL): records land after
flush and close, in batches, through bursts, overflow and write failures."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import event, func, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from rwkv_gateway.db.models import RequestLogEntry
from rwkv_gateway.db.repo import RequestLogRepo
from rwkv_gateway.db.session import SqlStorage
from rwkv_gateway.domain.types import RequestRecord
from rwkv_gateway.services.requestlog import RequestLogger
from support.postgres import BOTH

DB_BACKENDS = BOTH


@pytest.fixture
def commits(db_engine: AsyncEngine) -> list[int]:
    """One entry per committed transaction on the engine."""
    seen: list[int] = []
    event.listen(db_engine.sync_engine, "commit", lambda conn: seen.append(1))
    return seen


def rec(i: int, **kw: Any) -> RequestRecord:
    fields: dict[str, Any] = {
        "request_id": f"req-{i}",
        "dialect": "openai",
        "user": None,
        "api_key_id": None,
        "prompt_tokens": i,
        "completion_tokens": 2 * i,
        "ttft_ms": 1.5,
        "total_ms": 10.0,
        "finish_reason": "stop",
    }
    fields.update(kw)
    return RequestRecord(**fields)


async def count_rows(sessions: async_sessionmaker[AsyncSession]) -> int:
    async with sessions() as session:
        return await RequestLogRepo(session).count()


async def test_recorded_requests_appear_after_flush(sessions: async_sessionmaker[AsyncSession]) -> None:
    log = RequestLogger(SqlStorage(sessions))
    await log.start()
    created = time.time() - 60
    log.record(rec(1, user="sbin", api_key_id="7", ttft_ms=None, created_at=created, dialect="wenxin"))
    log.record(rec(2, finish_reason="length"))
    await log.flush()
    async with sessions() as session:
        rows = await RequestLogRepo(session).recent(10)
    assert [row.request_id for row in rows] == ["req-2", "req-1"]
    first = rows[1]
    assert (first.dialect, first.user, first.api_key_id) == ("wenxin", "sbin", "7")
    assert (first.prompt_tokens, first.completion_tokens, first.ttft_ms, first.total_ms) == (1, 2, None, 10.0)
    assert first.finish_reason == "stop"
    assert first.created_at == datetime.fromtimestamp(created, UTC)
    assert rows[0].finish_reason == "length"
    assert log.written == 2
    await log.aclose()


async def test_aclose_writes_what_is_pending_and_stops(sessions: async_sessionmaker[AsyncSession]) -> None:
    log = RequestLogger(SqlStorage(sessions), max_delay_s=60)
    await log.start()
    for i in range(5):
        log.record(rec(i))
    await log.aclose()
    assert await count_rows(sessions) == 5
    log.record(rec(99))
    assert log.dropped == 1
    await log.aclose()  # idempotent
    assert await count_rows(sessions) == 5


async def test_records_made_before_start_are_written(sessions: async_sessionmaker[AsyncSession]) -> None:
    log = RequestLogger(SqlStorage(sessions))
    log.record(rec(1))
    await log.start()
    await log.flush()
    assert await count_rows(sessions) == 1
    await log.aclose()


async def test_flush_without_a_writer_writes_inline(sessions: async_sessionmaker[AsyncSession]) -> None:
    log = RequestLogger(SqlStorage(sessions), batch_size=4)
    for i in range(10):
        log.record(rec(i))
    await log.flush()
    assert await count_rows(sessions) == 10
    await log.aclose()


async def test_full_batches_are_written_in_one_transaction_each(
    sessions: async_sessionmaker[AsyncSession], commits: list[int]
) -> None:
    log = RequestLogger(SqlStorage(sessions), batch_size=10, max_delay_s=60)
    for i in range(25):
        log.record(rec(i))
    await log.start()
    # Two full batches go out without waiting for the delay; the last five wait for it (or a flush).
    for _ in range(200):
        if await count_rows(sessions) >= 20:
            break
        await asyncio.sleep(0.01)
    assert await count_rows(sessions) == 20
    await log.flush()
    assert await count_rows(sessions) == 25
    assert len(commits) == 3
    await log.aclose()


async def test_a_partial_batch_goes_out_after_the_delay(
    sessions: async_sessionmaker[AsyncSession], commits: list[int]
) -> None:
    log = RequestLogger(SqlStorage(sessions), batch_size=100, max_delay_s=0.05)
    await log.start()
    for i in range(3):
        log.record(rec(i))
    for _ in range(500):
        if await count_rows(sessions) == 3:
            break
        await asyncio.sleep(0.01)
    assert await count_rows(sessions) == 3
    assert len(commits) == 1
    await log.aclose()


async def test_a_burst_of_500_all_land(
    sessions: async_sessionmaker[AsyncSession], commits: list[int]
) -> None:
    log = RequestLogger(SqlStorage(sessions))
    await log.start()
    for i in range(500):
        log.record(rec(i, dialect="glm" if i % 2 else "openai"))
    await log.aclose()
    assert await count_rows(sessions) == 500
    assert log.written == 500
    assert log.dropped == log.failed == 0
    # Batched: far fewer transactions than records.
    assert len(commits) <= 5
    async with sessions() as session:
        ids = set((await session.scalars(select(RequestLogEntry.request_id))).all())
        glm = await session.scalar(
            select(func.count()).select_from(RequestLogEntry).where(RequestLogEntry.dialect == "glm")
        )
    assert ids == {f"req-{i}" for i in range(500)}
    assert glm == 250


async def test_records_from_other_threads_land(sessions: async_sessionmaker[AsyncSession]) -> None:
    log = RequestLogger(SqlStorage(sessions))
    await log.start()

    def from_thread() -> None:
        for i in range(20):
            log.record(rec(i))

    # The thread's handed-over record() calls are queued on the loop before to_thread's own result.
    await asyncio.to_thread(from_thread)
    await log.aclose()
    assert await count_rows(sessions) == 20


async def test_overflow_drops_with_a_warning(
    sessions: async_sessionmaker[AsyncSession], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="rwkv_gateway.services.requestlog")
    log = RequestLogger(SqlStorage(sessions), max_pending=5)
    for i in range(8):
        log.record(rec(i))
    assert log.dropped == 3
    assert log.pending == 5
    assert any("queue full" in r.getMessage() for r in caplog.records)
    await log.start()
    await log.flush()
    assert any("dropped 3 records" in r.getMessage() for r in caplog.records)
    assert await count_rows(sessions) == 5
    await log.aclose()


class FlakySessions:
    """A session factory whose first `failures` sessions fail when the batch is written."""

    def __init__(self, real: async_sessionmaker[AsyncSession], failures: int) -> None:
        self.real = real
        self.failures = failures
        self.calls = 0

    def __call__(self) -> AsyncSession:
        self.calls += 1
        if self.calls <= self.failures:
            raise ConnectionError("database unavailable")
        return self.real()


async def test_a_failed_write_is_retried_once(
    sessions: async_sessionmaker[AsyncSession], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="rwkv_gateway.services.requestlog")
    flaky = FlakySessions(sessions, failures=1)
    log = RequestLogger(SqlStorage(flaky), retry_delay_s=0)  # type: ignore[arg-type]
    await log.start()
    log.record(rec(1))
    await log.flush()
    assert await count_rows(sessions) == 1
    assert flaky.calls == 2
    assert any("retrying once" in r.getMessage() for r in caplog.records)
    await log.aclose()


async def test_a_batch_failing_twice_is_reported_and_the_writer_goes_on(
    sessions: async_sessionmaker[AsyncSession], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="rwkv_gateway.services.requestlog")
    log = RequestLogger(SqlStorage(FlakySessions(sessions, failures=2)), retry_delay_s=0)  # type: ignore[arg-type]
    await log.start()
    log.record(rec(1))
    log.record(rec(2))
    await log.flush()
    assert log.failed == 2
    assert any("failed twice" in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records)
    log.record(rec(3))
    await log.flush()
    async with sessions() as session:
        assert [row.request_id for row in await RequestLogRepo(session).recent()] == ["req-3"]
    await log.aclose()


async def test_repo_add_only_flushes(sessions: async_sessionmaker[AsyncSession]) -> None:
    async with sessions() as session:
        repo = RequestLogRepo(session)
        entry = await repo.add(rec(1))
        assert entry.id is not None
        assert await repo.add_many([rec(2), rec(3)]) == 2
        assert await repo.count() == 3
        await session.rollback()
    assert await count_rows(sessions) == 0


async def test_start_twice_is_refused(sessions: async_sessionmaker[AsyncSession]) -> None:
    log = RequestLogger(SqlStorage(sessions))
    await log.start()
    with pytest.raises(RuntimeError, match="already started"):
        await log.start()
    await log.aclose()
    with pytest.raises(RuntimeError, match="closed"):
        await log.start()


class HangingSession:
    """A session whose opening never completes, like a database that stopped answering."""

    async def __aenter__(self) -> HangingSession:
        await asyncio.Event().wait()
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None


async def test_an_interrupted_close_reports_what_was_not_written(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="rwkv_gateway.services.requestlog")
    log = RequestLogger(SqlStorage(HangingSession), batch_size=2)  # type: ignore[arg-type]
    await log.start()
    for i in range(5):
        log.record(rec(i))
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(log.aclose(), timeout=0.2)
    assert log.failed == 5
    assert log.written == 0
    messages = [r.getMessage() for r in caplog.records]
    assert "request log writer cancelled; 2 records not written" in messages
    assert "request log closed with 3 records not written" in messages
