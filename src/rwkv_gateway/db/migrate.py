"""Schema migrations from inside the program: build Alembic's Config in code and upgrade, downgrade or
inspect a database.

The Config points at the migration scripts wherever the import system finds the package
`rwkv_gateway.migrations`: `migrations/` at the top of the repository in an editable install, the copy
inside the package in an installed wheel (pyproject.toml maps the one onto the other). It never reads
`alembic.ini`, so Alembic's logging setup is not applied over the service's. These functions are
synchronous, and the migration environment runs its async engine with `asyncio.run`, so they must be
called from a thread without a running event loop; async code calls them as
`await asyncio.to_thread(upgrade, url)`.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection
from sqlalchemy.pool import NullPool

from rwkv_gateway.db.session import create_db_engine

logger = logging.getLogger(__name__)


def migrations_dir() -> Path:
    """The directory holding the Alembic environment (`env.py`) and its `versions/`."""
    # Not a path next to this file: in a checkout the scripts sit at the repository root and only the
    # package mapping (pyproject.toml's package-dir, which the wheel and the editable install both
    # apply) makes them `rwkv_gateway.migrations`. find_spec locates the package without importing it.
    spec = importlib.util.find_spec("rwkv_gateway.migrations")
    if spec is None:
        raise RuntimeError("rwkv_gateway.migrations not found: install the project (pip install -e .)")
    if spec.origin is None:
        # A directory without __init__.py found first, as a namespace package: in an older checkout,
        # src/rwkv_gateway/migrations kept alive by its __pycache__ after the scripts moved to the root.
        found = ", ".join(spec.submodule_search_locations or [])
        raise RuntimeError(f"{found} is not the migrations package (left from an older layout?): delete it")
    return Path(spec.origin).parent


def alembic_config(url: str) -> Config:
    """An Alembic Config for `url` using the package's migrations, without any ini file."""
    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    # Config values go through configparser interpolation: a URL-encoded password ("%40") needs "%%".
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    config.attributes["configure_logging"] = False
    return config


def _refuse_running_loop(what: str) -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise RuntimeError(f"{what}() runs its own event loop; call it via asyncio.to_thread() from async code")


def upgrade(url: str, revision: str = "head") -> None:
    """Upgrade the database at `url` to `revision` (a no-op when it is already there)."""
    _refuse_running_loop("upgrade")
    logger.info("upgrading database schema to %s", revision)
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str) -> None:
    """Downgrade the database at `url` to `revision` ("base" removes every table)."""
    _refuse_running_loop("downgrade")
    logger.info("downgrading database schema to %s", revision)
    command.downgrade(alembic_config(url), revision)


def head_revision() -> str | None:
    """The newest revision the package ships."""
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    return script.get_current_head()


def _read_revision(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


async def _current_revision(url: str) -> str | None:
    engine = create_db_engine(url, poolclass=NullPool)
    try:
        async with engine.connect() as connection:
            return await connection.run_sync(_read_revision)
    finally:
        await engine.dispose()


def current_revision(url: str) -> str | None:
    """The revision the database at `url` is at; None for an empty (never migrated) database."""
    _refuse_running_loop("current_revision")
    return asyncio.run(_current_revision(url))
