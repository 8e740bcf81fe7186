"""Alembic migrations against real SQLite files: upgrade, downgrade, idempotence, atomicity, and that the
migrations build exactly the schema the ORM models describe."""

from __future__ import annotations

import asyncio
import io
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from rwkv_gateway.db.migrate import (
    alembic_config,
    current_revision,
    downgrade,
    head_revision,
    migrations_dir,
    upgrade,
)
from rwkv_gateway.db.models import Base

MODEL_TABLES = set(Base.metadata.tables)


@pytest.fixture
def db_file(tmp_path: Path) -> Path:
    return tmp_path / "data" / "gateway.db"


@pytest.fixture
def url(db_file: Path) -> str:
    return f"sqlite+aiosqlite:///{db_file}"


@pytest.fixture
def sync_engine(db_file: Path) -> Iterator[sa.Engine]:
    """A plain sqlite3 engine for inspecting the file the async migrations wrote."""
    engine = sa.create_engine(f"sqlite:///{db_file}", poolclass=sa.NullPool)
    yield engine
    engine.dispose()


def table_names(engine: sa.Engine) -> set[str]:
    with engine.connect() as conn:
        return set(sa.inspect(conn).get_table_names())


def schema_sql(engine: sa.Engine) -> list[str]:
    with engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT sql FROM sqlite_master WHERE sql IS NOT NULL ORDER BY name")
        return [row[0] for row in rows]


def diff_against(engine: sa.Engine, metadata: sa.MetaData) -> list[object]:
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(context, metadata))


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


def test_upgrade_head_creates_every_table(url: str, db_file: Path, sync_engine: sa.Engine) -> None:
    assert not db_file.parent.exists()
    assert current_revision(url) is None
    upgrade(url)
    assert db_file.exists()
    assert table_names(sync_engine) == MODEL_TABLES | {"alembic_version"}
    assert current_revision(url) == head_revision() == "0003"


def test_migrated_schema_matches_models(url: str, sync_engine: sa.Engine) -> None:
    upgrade(url)
    assert diff_against(sync_engine, Base.metadata) == []


def test_schema_comparison_sees_drift(url: str, sync_engine: sa.Engine) -> None:
    """Guards the test above against passing vacuously: a changed model must show up as a difference."""
    upgrade(url)
    drifted = sa.MetaData(naming_convention=Base.metadata.naming_convention)
    for table in Base.metadata.tables.values():
        table.to_metadata(drifted)
    drifted.tables["request_log"].append_column(sa.Column("extra", sa.Integer()))
    sa.Index("ix_users_created_at", drifted.tables["users"].c.created_at)
    kinds = {diff[0] for diff in diff_against(sync_engine, drifted) if isinstance(diff, tuple)}
    assert {"add_column", "add_index"} <= kinds


def test_downgrade_base_then_upgrade_again(url: str, sync_engine: sa.Engine) -> None:
    upgrade(url)
    downgrade(url, "base")
    assert table_names(sync_engine) & MODEL_TABLES == set()
    assert current_revision(url) is None
    upgrade(url)
    assert table_names(sync_engine) >= MODEL_TABLES
    assert diff_against(sync_engine, Base.metadata) == []


def test_upgrade_twice_is_a_no_op(url: str, sync_engine: sa.Engine) -> None:
    upgrade(url)
    with sync_engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO users (name, is_guest, created_at, last_seen_at) "
                "VALUES ('sbin', 0, '2024-01-01 00:00:00', '2024-01-01 00:00:00')"
            )
        )
    before = schema_sql(sync_engine)
    upgrade(url)
    assert schema_sql(sync_engine) == before
    assert current_revision(url) == head_revision()
    with sync_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT name FROM users")).scalars().all() == ["sbin"]


def test_failed_migration_leaves_the_database_untouched(
    tmp_path: Path, url: str, sync_engine: sa.Engine
) -> None:
    """On SQLite all pending revisions run in one transaction: a failure rolls back the earlier ones too."""
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
    assert table_names(sync_engine) == set()
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
