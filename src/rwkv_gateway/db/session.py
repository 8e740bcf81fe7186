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
transaction is one session, rolled back unless the service commits it. A failure that means the
database is unreachable or too slow (db/errors.py) leaves it as the domain's `StorageUnavailable`, so
each dialect answers with its own retryable error, and is counted through the `on_error` hook.
`SqlStorage.unavailable()` is the readiness check: a `SELECT 1` with a short timeout, its answer kept
for a moment so frequent probes cost the database one query per `READY_CACHE_S`.

`DbOptions` carries the pool and timeout settings. Server databases get them all, plus a pre-ping on
every checkout, so connections broken by a database restart are replaced instead of failing a
request; SQLite files get the pool sizes and keep their busy timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry

from rwkv_gateway.db.errors import outage_kind
from rwkv_gateway.db.repo import SqlUnitOfWork
from rwkv_gateway.errors import StorageUnavailable

logger = logging.getLogger(__name__)

#: Writers queue on the lock (see BEGIN IMMEDIATE above): long enough for a burst of hundreds.
DEFAULT_BUSY_TIMEOUT_MS = 30_000
#: How long a readiness answer about the database is reused, and how long its `SELECT 1` may take.
READY_CACHE_S = 1.5
READY_TIMEOUT_S = 2.0


@dataclass(frozen=True, slots=True)
class DbOptions:
    """Pool and timeouts (RWKV_GATEWAY_DB_* settings; docs/operations.md#configuration)."""

    pool_size: int = 5
    max_overflow: int = 10
    pool_timeout_s: float = 30.0
    connect_timeout_s: float = 5.0
    #: 0: none.
    statement_timeout_s: float = 30.0

    def engine_kwargs(self, url: str) -> dict[str, Any]:
        """`create_async_engine` keyword arguments for `url`."""
        if sqlite_path(url) is None and is_sqlite(url):
            return {}  # in-memory SQLite: a single shared connection, no pool to size
        kwargs: dict[str, Any] = {
            "pool_size": self.pool_size,
            "max_overflow": self.max_overflow,
            "pool_timeout": self.pool_timeout_s,
        }
        if is_sqlite(url):
            return kwargs
        kwargs["pool_pre_ping"] = True
        if make_url(url).get_driver_name() == "asyncpg":
            connect: dict[str, Any] = {"timeout": self.connect_timeout_s}
            if self.statement_timeout_s > 0:
                # Client side, so a server that stopped answering cannot hold a request forever too.
                connect["command_timeout"] = self.statement_timeout_s
            kwargs["connect_args"] = connect
        return kwargs


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
    options: DbOptions | None = None,
    **kwargs: Any,
) -> AsyncEngine:
    """An async engine for `url`; for a SQLite file, its directory is created and the pragmas set.

    `foreign_keys=False` is for migrations only: SQLite's batch mode drops and recreates tables, and
    with enforcement on, dropping a parent table would cascade-delete its children's rows.
    `begin_immediate=False` leaves BEGIN to the caller (the migrations emit their own). Extra
    keyword arguments go to `create_async_engine` (pool sizes for PostgreSQL, for example). The
    caller owns the engine and must `await engine.dispose()` when done. `options` adds the pool and
    timeout settings (the server's engine; migrations and one-off commands use a plain one).
    """
    if options is not None:
        kwargs = {**options.engine_kwargs(url), **kwargs}
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
    `make_session_factory`). Closing a unit that was not committed rolls it back. `on_error(kind)` is
    called for each outage error (see the module docstring)."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        *,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        self.sessions = sessions
        self.on_error = on_error
        self._ready: tuple[float, str | None] | None = None
        self._ready_lock = asyncio.Lock()

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[SqlUnitOfWork]:
        try:
            async with self.sessions() as session:
                yield SqlUnitOfWork(session)
        except StorageUnavailable:
            raise
        except Exception as exc:
            outage = self._outage(exc)
            if outage is None:
                raise
            raise outage from exc

    def _outage(self, exc: BaseException) -> StorageUnavailable | None:
        kind = outage_kind(exc)
        if kind is None:
            return None
        logger.warning("database unavailable (%s): %s", kind, _describe(exc))
        if self.on_error is not None:
            self.on_error(kind)
        return StorageUnavailable(f"database unavailable ({kind}), retry later")

    async def unavailable(self) -> str | None:
        """None while the database answers a `SELECT 1` within `READY_TIMEOUT_S`; otherwise why not.
        Answers are reused for `READY_CACHE_S`, and concurrent callers share one query."""
        async with self._ready_lock:
            now = time.monotonic()
            if self._ready is not None and now - self._ready[0] < READY_CACHE_S:
                return self._ready[1]
            reason: str | None = None
            bind = self.sessions.kw.get("bind")
            if not isinstance(bind, AsyncEngine):
                return "database not open"
            # A plain connection, not a service session: on SQLite those BEGIN IMMEDIATE and would
            # queue behind writers; a deferred SELECT 1 takes no lock at all.
            probe = bind.execution_options(**{BEGIN_OPTION: "DEFERRED"})
            try:
                async with asyncio.timeout(READY_TIMEOUT_S), probe.connect() as conn:
                    await conn.execute(text("SELECT 1"))
            except TimeoutError:
                reason = f"database did not answer within {READY_TIMEOUT_S:g}s"
                if self.on_error is not None:
                    self.on_error("timeout")
            except Exception as exc:
                if (outage := self._outage(exc)) is None:
                    raise
                reason = f"{outage.message.removesuffix(', retry later')}: {_describe(exc)}"
            self._ready = (time.monotonic(), reason)
            return reason


def _describe(exc: BaseException) -> str:
    """The driver's error, one line: never SQLAlchemy's own text, which quotes the statement and its
    parameters (conversation text among them, which logs must not carry; docs/operations.md#logs)."""
    cause = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    detail = (str(cause).splitlines() or [""])[0][:200]
    return f"{type(cause).__name__}: {detail}"
