"""Role-play fixtures: the real app (engine on the tiny v7 checkpoint, SQLite), a client that posts
form bodies exactly as the Vue UI does, and a factory that can start the app again on the same data
directory (restart tests)."""

# ruff: noqa: RUF001

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from fastapi import FastAPI

from rwkv_gateway.settings import Settings
from support.app import running_app

#: What JavaScript's encodeURIComponent leaves alone (a space becomes %20, never "+").
_JS_SAFE = "-_.!~*'()"
#: Short replies keep the tests fast (the random model rarely writes a blank line).
REPLY_TOKENS = 8


def ui_body(fields: dict[str, Any]) -> str:
    """A form body as the UI builds it: `k=v&...`, encodeURIComponent on both, token last."""
    return "&".join(
        f"{quote(str(k), safe=_JS_SAFE)}={quote(str(v), safe=_JS_SAFE)}" for k, v in fields.items()
    )


@dataclass(slots=True)
class RP:
    app: FastAPI
    client: httpx.AsyncClient
    settings: Settings

    async def raw(self, path: str, fields: dict[str, Any] | None = None, **kw: Any) -> httpx.Response:
        body = ui_body(fields or {})
        headers = {"Content-Type": "application/x-www-form-urlencoded", **kw.pop("headers", {})}
        return await self.client.post(path, content=body.encode(), headers=headers, **kw)

    async def call(self, path: str, fields: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
        resp = await self.raw(path, fields, **kw)
        assert resp.status_code == 200
        assert resp.headers["content-type"] == "application/json; charset=utf-8"
        out: dict[str, Any] = json.loads(resp.content)
        assert list(out) == ["data", "message", "code"]
        return out

    async def ok(self, path: str, fields: dict[str, Any] | None = None) -> Any:
        out = await self.call(path, fields)
        assert (out["message"], out["code"]) == ("success", 200), out
        return out["data"]

    async def guest(self) -> dict[str, str]:
        data = await self.ok("/login/tmp", {"token": "null"})
        return {"user_name": data["user_name"], "token": data["token"]}

    async def user(self, name: str, password: str = "pw-123456") -> dict[str, str]:
        await self.app.state.services.users.add(name, password)
        data = await self.ok("/login", {"user_name": name, "password": password, "token": "null"})
        return {"user_name": data["user_name"], "token": data["token"]}


Factory = Callable[..., Awaitable[RP]]


@pytest.fixture
async def rp_factory(tmp_path: Path, v7_path: Path, app_db_url: str | None) -> AsyncIterator[Factory]:
    """`await rp_factory(data_dir=..., **settings)`; `stop(rp)` shuts one down (to restart on its dir).
    The database is the SQLite file in the data directory, or PostgreSQL in modules that run on both
    (`DB_BACKENDS`)."""
    stacks: list[contextlib.AsyncExitStack] = []

    async def start(data_dir: Path | None = None, **overrides: Any) -> RP:
        overrides.setdefault("roleplay_max_reply_tokens", REPLY_TOKENS)
        overrides.setdefault("db_url", app_db_url)
        settings = Settings(model=v7_path, data_dir=data_dir or tmp_path / "data", **overrides)
        stack = contextlib.AsyncExitStack()
        served = await stack.enter_async_context(running_app(settings))
        stacks.append(stack)
        served.app.state.exit_stack = stack
        return RP(served.app, served.client, settings)

    yield start
    for stack in reversed(stacks):
        await stack.aclose()


async def stop(rp: RP) -> None:
    await rp.app.state.exit_stack.aclose()


@pytest.fixture
async def rp(rp_factory: Factory) -> RP:
    return await rp_factory()


# The character the tests save (the UI's field set).
CARD = {
    "bot": "小雪",
    "user": "哥哥",
    "greeting": "（跑过来）{{user}}，来聊天吧。",
    "bot_persona": "  你扮演{{char}}，是{{user}}的邻居。  ",
    "example_message": "{{user}}: 你好\n\n{{char}}: （笑）你好呀，{{user}}。",
    "use_qa": "",
    "avatar": "data:image/png;base64,iVBORw0KGgo=",
}
GREEDY = {"tau": "3", "rate": "0.1", "min_p": "0.05", "temperature": "0", "presence_penalty": "0.2"}
