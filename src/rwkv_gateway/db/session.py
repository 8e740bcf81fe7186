"""The database engine and session factory, with the SQLite connection settings the service relies on.

For SQLite every new connection gets WAL journaling (readers never block the writer), a busy
timeout (a writer waits for the lock instead of failing at once), foreign keys on (SQLite ignores
`ON DELETE CASCADE` without it) and `synchronous=NORMAL` (safe with WAL, far fewer fsyncs).

The services' sessions (`make_session_factory`) begin with `BEGIN IMMEDIATE`: a deferred transaction
that reads and then writes cannot wait for the write lock (its snapshot may be stale), so SQLite
fails it at once with "database is locked" whatever the busy timeout; taking the lock at BEGIN makes
concurrent writers queue on the busy timeout instead. Plain connections from the engine keep a
deferred BEGIN, and WAL readers never block. So a task must not hold one session's transaction
while it begins another's (it would wait on itself). Other async URLs such as
`postgresql+asyncpg://` are passed to SQLAlchemy unchanged.

`SqlStorage` is the domain's `Storage` (`domain/storage.py`) on such a session factory: each
transaction is one session, rolled back unless the service commits it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry

from rwkv_gateway.db.repo import SqlUnitOfWork

logger = logging.getLogger(__name__)

#: Writers queue on the lock (see BEGIN IMMEDIATE above): long enough for a burst of hundreds.
DEFAULT_BUSY_TIMEOUT_MS = 30_000


def is_sqlite(url: str | URL) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def sqlite_path(url: str | URL) -> Path | None:
    """The database file of a SQLite URL; None for in-memory databases and other backends."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return None
    database = parsed.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    if parsed.query.get("mode") == "memory":
        return None
    return Path(database)


def _sqlite_pragmas(busy_timeout_ms: int, foreign_keys: bool) -> Any:
    pragmas = (
        "PRAGMA journal_mode=WAL",
        f"PRAGMA busy_timeout={int(busy_timeout_ms)}",
        f"PRAGMA foreign_keys={'ON' if foreign_keys else 'OFF'}",
        "PRAGMA synchronous=NORMAL",
    )

    def on_connect(dbapi_connection: Any, connection_record: ConnectionPoolEntry) -> None:  # noqa: ARG001
        cursor = dbapi_connection.cursor()
        try:
            for pragma in pragmas:
                cursor.execute(pragma)
        finally:
            cursor.close()

    return on_connect


#: Execution option naming how a SQLite transaction begins ("IMMEDIATE" for the services' sessions).
BEGIN_OPTION = "rwkv_sqlite_begin"


def _begin_immediate(sync_engine: Any) -> None:
    # The driver opens transactions lazily with a plain (deferred) BEGIN; hand BEGIN to SQLAlchemy.
    def on_connect(dbapi_connection: Any, connection_record: ConnectionPoolEntry) -> None:  # noqa: ARG001
        dbapi_connection.isolation_level = None

    def on_begin(connection: Any) -> None:
        mode = connection.get_execution_options().get(BEGIN_OPTION, "")
        connection.exec_driver_sql("BEGIN IMMEDIATE" if mode == "IMMEDIATE" else "BEGIN")

    event.listen(sync_engine, "connect", on_connect)
    event.listen(sync_engine, "begin", on_begin)


def create_db_engine(
    url: str,
    *,
    busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
    foreign_keys: bool = True,
    begin_immediate: bool = True,
    echo: bool = False,
    **kwargs: Any,
) -> AsyncEngine:
    """An async engine for `url`; for a SQLite file, its directory is created and the pragmas set.

    `foreign_keys=False` is for migrations only: SQLite's batch mode drops and recreates tables, and
    with enforcement on, dropping a parent table would cascade-delete its children's rows.
    `begin_immediate=False` leaves BEGIN to the caller (the migrations emit their own). Extra
    keyword arguments go to `create_async_engine` (pool sizes for PostgreSQL, for example). The
    caller owns the engine and must `await engine.dispose()` when done.
    """
    engine = create_async_engine(url, echo=echo, **kwargs)
    if is_sqlite(url):
        path = sqlite_path(url)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        # Pragmas are per connection, so they go on the pool's "connect" event, which runs once for
        # each new DBAPI connection (the async engine's pool lives on its sync engine).
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas(busy_timeout_ms, foreign_keys))
        if begin_immediate:
            _begin_immediate(engine.sync_engine)
        logger.debug("SQLite database at %s", path or "(memory)")
    return engine


def make_session_factory(engine: AsyncEngine | None = None) -> async_sessionmaker[AsyncSession]:
    """Sessions that keep loaded attributes after commit, so results stay usable once a short session
    ends; on SQLite they begin IMMEDIATE (see the module docstring). Without `engine` the factory is
    unbound until `bind_session_factory` (the app builds its services before its lifespan opens the
    database)."""
    factory: async_sessionmaker[AsyncSession] = async_sessionmaker(expire_on_commit=False)
    if engine is not None:
        bind_session_factory(factory, engine)
    return factory


def bind_session_factory(factory: async_sessionmaker[AsyncSession], engine: AsyncEngine) -> None:
    """Make `factory`'s sessions use `engine` (BEGIN IMMEDIATE on SQLite)."""
    bind = engine.execution_options(**{BEGIN_OPTION: "IMMEDIATE"}) if is_sqlite(engine.url) else engine
    factory.configure(bind=bind)


class SqlStorage:
    """The services' storage: one `SqlUnitOfWork` per transaction, on `sessions` (from
    `make_session_factory`). Closing a unit that was not committed rolls it back."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self.sessions = sessions

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[SqlUnitOfWork]:
        async with self.sessions() as session:
            yield SqlUnitOfWork(session)
