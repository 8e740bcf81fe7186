"""SQLite under 200 concurrent write transactions through the real app: guest logins (a user row and a
token each), then a character saved by each of them, then a mix of saves, deletes and password
logins, all at once. Every request succeeds (no "database is locked" reaches a client) and the
database holds exactly what was written."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from collections.abc import Callable
from typing import Any

from live import CARD, AppFactory, form

WRITERS = 200


async def test_200_concurrent_write_transactions(
    app_factory: AppFactory, figure: Callable[[str], None]
) -> None:
    app = await app_factory()
    c = app.client

    async def post(path: str, fields: dict[str, Any]) -> Any:
        resp = await c.post(path, **form(fields))
        assert resp.status_code == 200
        out = json.loads(resp.content)
        assert (out["message"], out["code"]) == ("success", 200), (path, out)
        return out["data"]

    guests = await asyncio.gather(*(post("/login/tmp", {"token": "null"}) for _ in range(WRITERS)))
    auths = [{"user_name": g["user_name"], "token": g["token"]} for g in guests]
    assert len({a["user_name"] for a in auths}) == WRITERS
    await asyncio.gather(
        *(post("/characters/save", {**a, **CARD, "bot": f"角色{i}"}) for i, a in enumerate(auths))
    )
    for i in range(20):
        await app.app.state.services.users.add(f"member{i}", "pw-123456")

    def mixed(i: int) -> Any:
        a = auths[i]
        if i % 4 == 0:
            return post("/characters/del", {**a, "character_name": f"角色{i}"})
        if i % 4 == 1:
            return post("/characters/save", {**a, **CARD, "bot": f"新角色{i}"})
        if i % 4 == 2:
            return post("/login", {"user_name": f"member{i % 20}", "password": "pw-123456", "token": "null"})
        return post("/characters/load", {**a, "character_name": f"角色{i}"})  # creates the chat row

    await asyncio.gather(*(mixed(i) for i in range(WRITERS)))
    with contextlib.closing(sqlite3.connect(app.settings.data_dir / "gateway.db")) as db:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"users", "characters"} <= tables, tables
        n_users = db.execute("SELECT count(*) FROM users").fetchone()[0]
        n_chars = db.execute("SELECT count(*) FROM characters").fetchone()[0]
    assert n_users == WRITERS + 20
    # Each guest also got the default characters (if any) on its first login; count only ours.
    for i, a in enumerate(auths):
        names = {row["char_name"] for row in (await post("/characters/list", a))["list"]}
        expected = {f"角色{i}"} - ({f"角色{i}"} if i % 4 == 0 else set())
        if i % 4 == 1:
            expected.add(f"新角色{i}")
        assert expected <= names, (i, names)
        if i % 4 == 0:
            assert f"角色{i}" not in names
    writes = WRITERS * 3
    figure(
        f"SQLite: {writes} concurrent write requests in 3 waves of {WRITERS}, {writes} ok, 0 locked, "
        f"{n_users} users and {n_chars} characters stored"
    )
