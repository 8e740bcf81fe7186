"""Shared fixtures: tiny random-weight checkpoints in the real layouts, loaded through the real loader."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from rwkv_gateway.db.migrate import upgrade
from rwkv_gateway.db.session import create_db_engine, make_session_factory
from rwkv_gateway.engine.backend_rwkv import RwkvPackageBackend
from rwkv_gateway.engine.demo_model import write_demo_model
from rwkv_gateway.engine.loader import load_model
from rwkv_gateway.engine.scheduler import EngineConfig, Scheduler
from rwkv_gateway.engine.tokenizer import Tokenizer, load_tokenizer


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def v7_path(model_dir: Path) -> Path:
    return write_demo_model(model_dir / "tiny-v7.pth", "v7", n_layer=2, n_embd=128, seed=1)


@pytest.fixture(scope="session")
def v4_path(model_dir: Path) -> Path:
    return write_demo_model(model_dir / "tiny-v4.pth", "v4", n_layer=2, n_embd=128, seed=2)


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return load_tokenizer(None, 65536)


@pytest.fixture(scope="session")
def v7_backend(v7_path: Path) -> RwkvPackageBackend:
    return load_model(v7_path, "cpu fp32")


@pytest.fixture(scope="session")
def v4_backend(v4_path: Path) -> RwkvPackageBackend:
    return load_model(v4_path, "cpu fp32")


@pytest.fixture
def db_file(tmp_path: Path) -> Path:
    return tmp_path / "gateway.db"


@pytest.fixture
async def db_engine(db_file: Path) -> AsyncIterator[AsyncEngine]:
    """A migrated temporary SQLite database."""
    url = f"sqlite+aiosqlite:///{db_file}"
    await asyncio.to_thread(upgrade, url)
    engine = create_db_engine(url)
    yield engine
    await engine.dispose()


@pytest.fixture
def sessions(db_engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return make_session_factory(db_engine)


@pytest.fixture
def engine_config() -> EngineConfig:
    return EngineConfig(queue_size=64, max_batch_size=16, prefill_chunk=16, prefill_budget=64)


@pytest.fixture
async def engine(
    v7_backend: RwkvPackageBackend, tokenizer: Tokenizer, engine_config: EngineConfig
) -> AsyncIterator[Scheduler]:
    sched = Scheduler(v7_backend, tokenizer, engine_config)
    await sched.start()
    try:
        yield sched
    finally:
        await sched.aclose()
