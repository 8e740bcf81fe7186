"""Alembic migrations against real databases, SQLite files and PostgreSQL (each test that takes `url`
runs on both): upgrade, downgrade, idempotence, atomicity, that the migrations build exactly the
schema the ORM models describe (what `alembic check` checks), and that replicas starting together
on one empty database migrate it exactly once."""

from __future__ import annotations

import asyncio
import io
import logging
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.pool import NullPool

from rwkv_gateway.db.migrate import (
    alembic_config,
    current_revision,
    downgrade,
    head_revision,
    migrations_dir,
    upgrade,
)
from rwkv_gateway.db.models import Base
from rwkv_gateway.db.session import create_db_engine, is_sqlite
from support.postgres import BOTH

DB_BACKENDS = BOTH
MODEL_TABLES = set(Base.metadata.tables)
T = TypeVar("T")


@pytest.fixture
def db_file(tmp_path: Path) -> Path:
    return tmp_path / "data" / "gateway.db"


@pytest.fixture
def url(db_url: str) -> str:
    return db_url


def inspect_db(url: str, look: Callable[[sa.Connection], T]) -> T:
    """`look(connection)` on a plain connection to the database the migrations wrote."""

    async def run() -> T:
        engine = create_db_engine(url, poolclass=NullPool)
        try:
            async with engine.connect() as conn:
                return await conn.run_sync(look)
        finally:
            await engine.dispose()

    return asyncio.run(run())


def table_names(url: str) -> set[str]:
    return inspect_db(url, lambda conn: set(sa.inspect(conn).get_table_names()))


def schema_of(url: str) -> list[Any]:
    """Every table's columns, indexes, keys and constraints, as the backend reports them."""

    def look(conn: sa.Connection) -> list[Any]:
        insp = sa.inspect(conn)
        out: list[Any] = []
        for table in sorted(insp.get_table_names()):
            columns = [(c["name"], str(c["type"]), c["nullable"]) for c in insp.get_columns(table)]
            indexes = sorted((i["name"], tuple(i["column_names"])) for i in insp.get_indexes(table))
            fks = sorted((f["name"], tuple(f["constrained_columns"])) for f in insp.get_foreign_keys(table))
            uniques = sorted(
                (u["name"], tuple(u["column_names"])) for u in insp.get_unique_constraints(table)
            )
            out.append((table, columns, indexes, fks, uniques, insp.get_pk_constraint(table)))
        return out

    return inspect_db(url, look)


def diff_against(url: str, metadata: sa.MetaData) -> list[object]:
    def look(conn: sa.Connection) -> list[object]:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(context, metadata))

    return inspect_db(url, look)


def test_model_tables_are_the_expected_set() -> None:
    expected = {
        "users",
        "auth_tokens",
        "characters",
        "conversations",
        "conversation_nodes",
        "api_credentials",
        "access_tokens",
        "request_log",
        "tasks",
    }
    assert expected == MODEL_TABLES


def test_upgrade_head_creates_every_table(url: str, db_file: Path) -> None:
    sqlite = is_sqlite(url)
    if sqlite:
        assert not db_file.parent.exists()
    assert current_revision(url) is None
    upgrade(url)
    if sqlite:
        assert db_file.exists()
    assert table_names(url) == MODEL_TABLES | {"alembic_version"}
    assert current_revision(url) == head_revision() == "0003"


def test_migrated_schema_matches_models(url: str) -> None:
    upgrade(url)
    assert diff_against(url, Base.metadata) == []


def test_schema_comparison_sees_drift(url: str) -> None:
    """Guards the test above against passing vacuously: a changed model must show up as a difference."""
    upgrade(url)
    drifted = sa.MetaData(naming_convention=Base.metadata.naming_convention)
    for table in Base.metadata.tables.values():
        table.to_metadata(drifted)
    drifted.tables["request_log"].append_column(sa.Column("extra", sa.Integer()))
    sa.Index("ix_users_created_at", drifted.tables["users"].c.created_at)
    kinds = {diff[0] for diff in diff_against(url, drifted) if isinstance(diff, tuple)}
    assert {"add_column", "add_index"} <= kinds


def test_downgrade_base_then_upgrade_again(url: str) -> None:
    upgrade(url)
    downgrade(url, "base")
    assert table_names(url) & MODEL_TABLES == set()
    assert current_revision(url) is None
    upgrade(url)
    assert table_names(url) >= MODEL_TABLES
    assert diff_against(url, Base.metadata) == []


def test_upgrade_twice_is_a_no_op(url: str) -> None:
    upgrade(url)

    def insert(conn: sa.Connection) -> None:
        conn.execute(
            sa.text(
                "INSERT INTO users (name, is_guest, created_at, last_seen_at) "
                "VALUES ('sbin', false, '2024-01-01 00:00:00', '2024-01-01 00:00:00')"
            )
        )
        conn.commit()

    inspect_db(url, insert)
    before = schema_of(url)
    upgrade(url)
    assert schema_of(url) == before
    assert current_revision(url) == head_revision()
    names = inspect_db(url, lambda conn: conn.execute(sa.text("SELECT name FROM users")).scalars().all())
    assert names == ["sbin"]


def test_failed_migration_leaves_the_database_untouched(tmp_path: Path, url: str) -> None:
    """All pending revisions run in one transaction (PostgreSQL's DDL is transactional; on SQLite the
    environment makes it so): a failure rolls back the earlier ones too."""
    scripts = tmp_path / "migrations"
    shutil.copytree(migrations_dir(), scripts, ignore=shutil.ignore_patterns("__pycache__"))
    # Chained on the real head, so every real revision runs before the broken one.
    (scripts / "versions" / "9999_broken.py").write_text(
        "import sqlalchemy as sa\n"
        "from alembic import op\n"
        "revision = 'broken'\n"
        f"down_revision = {head_revision()!r}\n"
        "branch_labels = None\n"
        "depends_on = None\n"
        "def upgrade():\n"
        "    op.create_table('half_done', sa.Column('id', sa.Integer(), primary_key=True))\n"
        "    raise RuntimeError('boom')\n"
        "def downgrade():\n"
        "    pass\n"
    )
    config = alembic_config(url)
    config.set_main_option("script_location", str(scripts))
    with pytest.raises(RuntimeError, match="boom"):
        command.upgrade(config, "head")
    assert table_names(url) == set()
    assert current_revision(url) is None


async def test_async_callers_go_through_a_thread(url: str) -> None:
    with pytest.raises(RuntimeError, match="to_thread"):
        upgrade(url)
    await asyncio.to_thread(upgrade, url)
    assert await asyncio.to_thread(current_revision, url) == head_revision()


def test_program_migrations_leave_logging_alone(url: str) -> None:
    root = logging.getLogger()
    alembic_logger = logging.getLogger("alembic")
    before = (list(root.handlers), root.level, list(alembic_logger.handlers), alembic_logger.level)
    upgrade(url)
    downgrade(url, "base")
    after = (list(root.handlers), root.level, list(alembic_logger.handlers), alembic_logger.level)
    assert after == before


def test_offline_sql_for_postgresql() -> None:
    """The non-SQLite branch of the initial migration: the mutual foreign key is added after both tables."""
    config = alembic_config("postgresql+asyncpg://user:p%40ss@localhost/gateway")
    config.output_buffer = io.StringIO()
    command.upgrade(config, "head", sql=True)
    sql = config.output_buffer.getvalue()
    assert "CREATE TABLE conversation_nodes" in sql
    assert (
        "ALTER TABLE conversations ADD CONSTRAINT fk_conversations_current_node_id_conversation_nodes" in sql
    )
    assert "id BIGSERIAL NOT NULL" in sql
    assert "TIMESTAMP WITH TIME ZONE" in sql


#: Processes migrating one empty database at once (replicas starting together).
RACERS = 6


def test_replicas_starting_together_migrate_once(url: str) -> None:
    """`db upgrade` in several processes at the same moment: each one succeeds, the schema is whole and
    at head, and the version table has its one row (without the migration lock, PostgreSQL fails some
    with a unique violation on `alembic_version`; SQLite with "database is locked")."""
    cli = [sys.executable, "-m", "rwkv_gateway", "db", "upgrade", "--db-url", url]
    procs = [subprocess.Popen(cli, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(RACERS)]
    outputs = [proc.communicate(timeout=120)[0].decode(errors="replace") for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * RACERS, outputs
    assert current_revision(url) == head_revision()
    assert diff_against(url, Base.metadata) == []
    versions = inspect_db(url, lambda conn: conn.execute(sa.text("SELECT * FROM alembic_version")).all())
    assert len(versions) == 1
