"""A PostgreSQL outage under the real app: the test's own embedded server is stopped mid-test, then
started again. While it is down `/readyz` says 503 with the reason, every request that needs the
database gets its dialect's own retryable error (never a 500 page) and `/metrics` counts the errors;
once it is back the same app is ready and serves again, without a restart."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx

from rwkv_gateway.settings import Settings
from support.app import Served, running_app
from support.postgres import PostgresServer

ROLEPLAY_FORM = {"Content-Type": "application/x-www-form-urlencoded"}
CHAT = {"model": "tiny-v7", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


async def ready_status(client: httpx.AsyncClient, want: int, within_s: float = 30) -> dict[str, Any]:
    """Poll /readyz until it answers `want` (its answers are cached for a moment)."""
    deadline = time.monotonic() + within_s
    while True:
        resp = await client.get("/readyz")
        if resp.status_code == want:
            body: dict[str, Any] = resp.json()
            return body
        assert time.monotonic() < deadline, f"/readyz stayed {resp.status_code}: {resp.text}"
        await asyncio.sleep(0.1)


class Clients:
    """One client of each dialect that needs the database, with what it was given while it was up."""

    def __init__(self, served: Served) -> None:
        self.c = served.client
        self.key = ""
        self.ak = self.sk = self.baidu_token = ""
        self.roleplay: dict[str, str] = {}

    async def setup(self, served: Served) -> None:
        credentials = served.app.state.services.credentials
        self.key = (await credentials.create("openai")).api_key
        baidu = await credentials.create("baidu")
        self.ak, self.sk = baidu.api_key, baidu.secret_key or ""
        token = await self.c.post(
            f"/oauth/2.0/token?grant_type=client_credentials&client_id={self.ak}&client_secret={self.sk}"
        )
        self.baidu_token = token.json()["access_token"]
        guest = (await self.roleplay_call("/login/tmp", {"token": "null"}))["data"]
        self.roleplay = {"user_name": guest["user_name"], "token": guest["token"]}

    async def roleplay_call(self, path: str, fields: dict[str, str]) -> dict[str, Any]:
        body = "&".join(f"{k}={v}" for k, v in fields.items())
        resp = await self.c.post(path, content=body.encode(), headers=ROLEPLAY_FORM)
        assert resp.status_code == 200, resp.text
        out: dict[str, Any] = json.loads(resp.content)
        return out

    async def openai(self) -> httpx.Response:
        auth = {"Authorization": f"Bearer {self.key}"}
        return await self.c.post("/v1/chat/completions", json=CHAT, headers=auth)

    async def baidu(self) -> httpx.Response:
        body = {"messages": [{"role": "user", "content": "Hi"}], "max_output_tokens": 2}
        path = f"/rpc/2.0/ai_custom/v1/wenxinworkshop/chat/rwkv?access_token={self.baidu_token}"
        return await self.c.post(path, json=body)

    async def tasks(self) -> httpx.Response:
        auth = {"Authorization": f"Bearer {self.key}"}
        return await self.c.post("/v1/tasks/create", json={"prompt": "Once", "max_tokens": 1}, headers=auth)


async def test_a_database_outage_is_reported_and_survived(
    own_postgres: PostgresServer, tmp_path: Path, v7_path: Path
) -> None:
    settings = Settings(
        model=v7_path,
        data_dir=tmp_path / "data",
        db_url=own_postgres.fresh_database(),
        db_connect_timeout_s=2,
        db_pool_timeout_s=2,
    )
    async with running_app(settings) as served:
        clients = Clients(served)
        await clients.setup(served)
        ready = await ready_status(served.client, 200)
        assert ready["database"] == "ok"
        assert (await clients.openai()).status_code == 200

        own_postgres.stop()
        down = await ready_status(served.client, 503)
        assert down["status"] == "database_unavailable" and "database unavailable" in down["error"]

        openai = await clients.openai()
        assert openai.status_code == 503 and openai.headers["Retry-After"] == "5"
        assert openai.json()["error"]["type"] == "server_error"
        assert "database unavailable" in openai.json()["error"]["message"]

        baidu = await clients.baidu()
        assert baidu.status_code == 200
        assert baidu.json()["error_code"] == 336100  # Baidu's retryable "try again later"
        oauth = await clients.c.post(
            f"/oauth/2.0/token?grant_type=client_credentials&client_id={clients.ak}&client_secret={clients.sk}"
        )
        # The token endpoint answers in its OAuth shape (RFC 6749's "try again later"); no token issued.
        assert oauth.status_code == 503 and oauth.headers["Retry-After"] == "5"
        assert oauth.json()["error"] == "temporarily_unavailable", oauth.text
        assert "database unavailable" in oauth.json()["error_description"]

        roleplay = await clients.roleplay_call("/characters/list", clients.roleplay)
        assert (roleplay["data"], roleplay["code"]) == (None, 503), roleplay

        tasks = await clients.tasks()
        assert tasks.status_code == 503 and "detail" in tasks.json()

        # ChatGLM's routes keep no rows (only the request log, written in the background): they serve.
        glm = await served.client.post("/chat", json={"prompt": "Hi", "max_length": 24})
        assert glm.status_code == 200, glm.text

        metrics = (await served.client.get("/metrics")).text
        errors = [line for line in metrics.splitlines() if line.startswith("rwkv_gateway_db_errors_total{")]
        assert errors and sum(float(line.rsplit(" ", 1)[1]) for line in errors) >= 4, errors

        own_postgres.start()
        assert (await ready_status(served.client, 200))["database"] == "ok"
        assert (await clients.openai()).status_code == 200
        baidu = await clients.baidu()
        assert "error_code" not in baidu.json(), baidu.text
        assert (await clients.roleplay_call("/characters/list", clients.roleplay))["code"] == 200
        assert (await clients.tasks()).status_code == 200


async def test_readiness_does_not_queue_behind_sqlite_writers(tmp_path: Path, v7_path: Path) -> None:
    """The probe's SELECT 1 takes no lock: a writer holding SQLite's write lock does not make it wait."""
    settings = Settings(model=v7_path, data_dir=tmp_path / "data")
    async with running_app(settings) as served:
        writer = sqlite3.connect(settings.data_dir / "gateway.db", isolation_level=None)
        with contextlib.closing(writer) as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                ready = await ready_status(served.client, 200, within_s=5)
            finally:
                db.execute("ROLLBACK")
    assert ready["database"] == "ok"
