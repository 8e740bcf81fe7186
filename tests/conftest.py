"""Shared fixtures: tiny random-weight checkpoints in the real layouts, loaded through the real loader."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from rwkv_gateway.db.migrate import upgrade
from rwkv_gateway.db.session import create_db_engine, make_session_factory
from rwkv_gateway.domain.types import GenerationRequest, SamplingParams
from rwkv_gateway.engine import admission as admission_mod
from rwkv_gateway.engine.backend_rwkv import RwkvPackageBackend
from rwkv_gateway.engine.demo_model import write_demo_model
from rwkv_gateway.engine.loader import load_model
from rwkv_gateway.engine.sampler import Sampler
from rwkv_gateway.engine.scheduler import EngineConfig, Scheduler
from rwkv_gateway.engine.tokenizer import Tokenizer, load_tokenizer
from support.postgres import PostgresServer, PostgresUnavailable

#: Long fault-injection and fuzz tests: `pytest -m "not slow"` (the README's command) leaves them out,
#: `.ci/run` runs them after it with `pytest -m slow`.
SLOW_PATHS = ("faults/test_", "api/test_schemathesis.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    tests_dir = Path(__file__).parent
    for item in items:
        where = item.path.relative_to(tests_dir).as_posix()
        if where.startswith(SLOW_PATHS) and "test_queue_full" not in where:
            item.add_marker(pytest.mark.slow)


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


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test module that sets `DB_BACKENDS = BOTH` runs each of its tests that uses the database
    fixtures (`db_backend`, `db_url`, `db_engine`, `sessions`, `app_db_url` and the app factories built
    on them) once per backend; other tests get SQLite. `POSTGRESQL_SLOW = True` puts the PostgreSQL
    runs in the slow tier (long flows whose database part the fast tier already covers)."""
    backends = getattr(metafunc.module, "DB_BACKENDS", None)
    if backends and "db_backend" in metafunc.fixturenames:
        slow = getattr(metafunc.module, "POSTGRESQL_SLOW", False)
        params = [
            pytest.param(b, marks=pytest.mark.slow) if slow and b == "postgresql" else b for b in backends
        ]
        metafunc.parametrize("db_backend", params, indirect=True)


def start_postgres() -> PostgresServer:
    """A started server, or the test skips: a missing wheel is no failure on a developer's machine,
    but CI (`CI` set) must run the PostgreSQL tests, so there it fails."""
    try:
        server = PostgresServer()
    except PostgresUnavailable as exc:
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is required in CI: {exc}")
        pytest.skip(f"no PostgreSQL here: {exc}")
    try:
        server.start()
    except PostgresUnavailable as exc:
        server.close()
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is required in CI: {exc}")
        pytest.skip(f"PostgreSQL did not start: {exc}")
    return server


def running_postgres() -> Iterator[PostgresServer]:
    server = start_postgres()
    try:
        yield server
    finally:
        server.close()


#: One PostgreSQL server for the session (tests/support/postgres.py); each test takes a fresh database
#: on it. Tests that stop the server use `own_postgres` instead.
postgres = pytest.fixture(scope="session", name="postgres")(running_postgres)
#: A PostgreSQL server of the test's own, which it may stop and start (outages).
own_postgres = pytest.fixture(name="own_postgres")(running_postgres)


@pytest.fixture
def db_backend(request: pytest.FixtureRequest) -> str:
    """ "sqlite" unless the module asks for both (`DB_BACKENDS`)."""
    backend: str = getattr(request, "param", "sqlite")
    return backend


@pytest.fixture
def db_file(tmp_path: Path) -> Path:
    return tmp_path / "gateway.db"


@pytest.fixture
def db_url(db_backend: str, db_file: Path, request: pytest.FixtureRequest) -> str:
    """An empty database: a SQLite file in the test's directory, or a fresh PostgreSQL database."""
    if db_backend == "postgresql":
        server: PostgresServer = request.getfixturevalue("postgres")
        return server.fresh_database()
    return f"sqlite+aiosqlite:///{db_file}"


@pytest.fixture
def app_db_url(db_backend: str, request: pytest.FixtureRequest) -> str | None:
    """`db_url` for an app's settings: None (the SQLite file in its data directory) or a fresh
    PostgreSQL database, shared by every app the test starts (restarts see the same data)."""
    if db_backend == "postgresql":
        server: PostgresServer = request.getfixturevalue("postgres")
        return server.fresh_database()
    return None


@pytest.fixture
async def db_engine(db_url: str) -> AsyncIterator[AsyncEngine]:
    """A migrated temporary database (SQLite unless the module asks for both)."""
    url = db_url
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


#: The seed that marks the request `full_queue` holds on the model thread.
HOLD_SEED = 9090

FullQueue = Callable[[Any], AbstractAsyncContextManager[None]]


@pytest.fixture
def full_queue(monkeypatch: pytest.MonkeyPatch) -> Iterator[FullQueue]:
    """Fault injection for busy answers: `async with full_queue(engine):` (an engine started with
    max_batch_size=1 and queue_size=1) holds one request on the model thread, in the only batch slot,
    and queues another in the only queue place; on exit both are released and ended."""
    entered, release = threading.Event(), threading.Event()

    class HeldSampler(Sampler):
        def sample(self, logits):  # type: ignore[no-untyped-def]
            if self.params.seed == HOLD_SEED:
                entered.set()
                release.wait(60)
            return super().sample(logits)

    monkeypatch.setattr(admission_mod, "Sampler", HeldSampler)

    @contextlib.asynccontextmanager
    async def hold(engine: Any) -> AsyncIterator[None]:
        tokens = engine.codec.encode("Hello there")
        held = SamplingParams(temperature=0, seed=HOLD_SEED)
        running = await engine.submit(
            GenerationRequest(prompt_tokens=tokens, sampling=held, max_tokens=8, dialect="test")
        )
        waiting = None
        try:
            assert await asyncio.to_thread(entered.wait, 30)  # the one batch slot is busy
            waiting = await engine.submit(
                GenerationRequest(prompt_tokens=tokens, max_tokens=8, dialect="test")
            )
            yield
        finally:
            release.set()
            running.cancel()
            await running.collect()
            if waiting is not None:
                waiting.cancel()
                await waiting.collect()

    try:
        yield hold
    finally:
        release.set()
