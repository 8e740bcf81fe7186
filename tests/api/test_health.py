"""Health probes and the request log on the real app: lifespan, migrations, loader, engine, SQLite."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from rwkv_gateway.app import create_app
from rwkv_gateway.db.repo import RequestLogRepo
from rwkv_gateway.domain.types import GenerationRequest, SamplingParams
from rwkv_gateway.engine import runtime
from rwkv_gateway.settings import Settings


@pytest.fixture
def settings(tmp_path: Path, v7_path: Path) -> Settings:
    return Settings(model=v7_path, data_dir=tmp_path / "data")


async def started(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


async def test_readyz_is_503_until_the_model_is_loaded(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()
    real_load = runtime.load

    def slow_load(s: Settings) -> runtime.LoadedModel:  # fault injection: hold the load until released
        release.wait(30)
        return real_load(s)

    monkeypatch.setattr(runtime, "load", slow_load)
    app = create_app(settings)
    async for client in started(app):
        assert (await client.get("/healthz")).json() == {"status": "ok"}
        loading = await client.get("/readyz")
        assert loading.status_code == 503 and loading.json()["status"] == "loading"
        assert loading.headers["retry-after"]
        release.set()
        await asyncio.wait_for(app.state.services.model.ready.wait(), 60)
        ready = await client.get("/readyz")
        assert ready.status_code == 200
        body = ready.json()
        assert body["status"] == "ready" and body["model"] == "tiny-v7" and body["rwkv_version"] == "7"
        assert body["strategy"] == "cpu fp32" and body["demo_model"] is False
        assert body["chat_template"] == "world"
        assert body["queue_depth"] == 0 and body["active_sequences"] == 0


async def test_load_failure_is_reported_not_crashed(tmp_path: Path) -> None:
    garbage = tmp_path / "bad.pth"
    garbage.write_bytes(b"nope")
    app = create_app(Settings(model=garbage, data_dir=tmp_path / "data"))
    async for client in started(app):
        for _ in range(200):
            if app.state.services.model.load_error:
                break
            await asyncio.sleep(0.02)
        resp = await client.get("/readyz")
        assert resp.status_code == 503
        assert resp.json()["status"] == "failed"
        assert "not a PyTorch checkpoint" in resp.json()["error"]


async def test_every_generation_writes_one_request_log_row(settings: Settings) -> None:
    app = create_app(settings)
    async for _client in started(app):
        await asyncio.wait_for(app.state.services.model.ready.wait(), 60)
        engine = app.state.services.model.engine
        greedy = SamplingParams(temperature=0)
        for i in range(3):
            stream = await engine.submit(
                GenerationRequest(
                    prompt=f"hello {i}", sampling=greedy, max_tokens=4, dialect="test", user=f"u{i}"
                )
            )
            await stream.collect()
        cancelled = await engine.submit(GenerationRequest(prompt="bye", max_tokens=500, dialect="test"))
        cancelled.cancel()
        await cancelled.collect()
        await app.state.services.request_log.flush()
        async with app.state.services.storage.sessions() as session:
            rows = await RequestLogRepo(session).recent(10)
    assert len(rows) == 4
    by_user = {r.user: r for r in rows}
    assert {"u0", "u1", "u2"} <= set(by_user)
    row = by_user["u1"]
    assert row.dialect == "test" and row.completion_tokens == 4 and row.prompt_tokens > 0
    assert row.finish_reason == "length" and row.total_ms > 0 and row.ttft_ms is not None
    assert sorted(r.finish_reason for r in rows) == ["cancelled", "length", "length", "length"]
