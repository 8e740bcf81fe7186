"""Alembic environment: runs the migrations on the async engine, in batch mode so SQLite can alter tables.

The URL comes from the Config's `sqlalchemy.url` main option (set in code by `rwkv_gateway.db.migrate`);
when it is empty, as in the shipped `alembic.ini`, the service's own settings decide it
(`RWKV_GATEWAY_DB_URL`, else the SQLite file in `RWKV_GATEWAY_DATA_DIR`). Logging is configured from
the ini file only when Alembic runs from the command line, never when the service migrates itself.
On SQLite all migrations run in one real transaction with foreign-key enforcement off (batch mode
recreates tables, which must not cascade), and the foreign keys are checked before committing.

Replicas that start together on one empty database migrate it exactly once: each migration run holds
a database-wide lock from before it reads the schema version until it commits, so the others wait,
then find the database at head and do nothing. On PostgreSQL that is a transaction-level advisory
lock (`pg_advisory_xact_lock`, released by the commit or by the server when the connection dies);
on SQLite it is the database's own write lock, taken at `BEGIN IMMEDIATE` (a deferred transaction
that had already read could not wait for the lock and would fail with "database is locked").
"""

from __future__ import annotations

import asyncio
from logging.config import fileConfig
from typing import Any, Literal

from alembic import context
from alembic.autogenerate.api import AutogenContext
from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.pool import ConnectionPoolEntry, NullPool

from rwkv_gateway.db.base import UTCDateTime
from rwkv_gateway.db.models import Base
from rwkv_gateway.db.session import create_db_engine, is_sqlite

config = context.config

if config.config_file_name is not None and config.attributes.get("configure_logging", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata

#: The PostgreSQL advisory lock key the migration runs take ("rwkv" in ASCII; any fixed bigint would do).
MIGRATION_LOCK_KEY = 0x72776B76


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    if url:
        return url
    from rwkv_gateway.settings import Settings

    return Settings().database_url


def _render_item(type_: str, obj: Any, autogen_context: AutogenContext) -> str | Literal[False]:  # noqa: ARG001
    # Keep migration scripts free of application imports: UTCDateTime is stored as a plain
    # timezone-aware DATETIME, so that is what autogenerate should write (`sa` is in the template).
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def _configure(**kwargs: Any) -> None:
    context.configure(
        target_metadata=target_metadata,
        render_as_batch=True,
        compare_type=True,
        render_item=_render_item,
        **kwargs,
    )


def run_migrations_offline() -> None:
    """Write the SQL to stdout (`alembic upgrade head --sql`) instead of running it."""
    _configure(url=_url(), literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def _run_sync(connection: Connection) -> None:
    sqlite = connection.dialect.name == "sqlite"
    if connection.dialect.name == "postgresql":
        # Begins the transaction the migrations then run in (see the module docstring).
        connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK_KEY})")
    # With the BEGIN listener below, SQLite DDL is transactional; tell Alembic so it runs every
    # pending migration in one transaction instead of one per revision.
    _configure(connection=connection, **({"transactional_ddl": True} if sqlite else {}))
    with context.begin_transaction():
        context.run_migrations()
        if sqlite:
            problems = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
            if problems:
                raise RuntimeError(f"migration left rows violating foreign keys: {problems[:10]}")


def _transactional_sqlite(sync_engine: Any) -> None:
    # The sqlite3 driver commits before DDL and opens transactions lazily; hand transaction control
    # to SQLAlchemy so a failed migration rolls back completely instead of leaving half a schema.
    def on_connect(dbapi_connection: Any, connection_record: ConnectionPoolEntry) -> None:  # noqa: ARG001
        dbapi_connection.isolation_level = None

    def on_begin(connection: Connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")  # serialises concurrent migration runs

    event.listen(sync_engine, "connect", on_connect)
    event.listen(sync_engine, "begin", on_begin)


async def run_migrations_online() -> None:
    url = _url()
    engine = create_db_engine(url, foreign_keys=False, begin_immediate=False, poolclass=NullPool)
    if is_sqlite(url):
        _transactional_sqlite(engine.sync_engine)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run_sync)
            await connection.commit()
    finally:
        await engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    asyncio.run(run_migrations_online())
