"""What the fault tests share besides tests/support/: the type of their `app_factory` fixture, and the
role-play UI's form client (in process and against a live server) and character.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

import httpx

from support.app import Served
from support.live import LiveServer, log_tail

_JS_SAFE = "-_.!~*'()"


#: `await app_factory(**settings)`: the real app (tests/support/app.py) on the tiny v7 checkpoint.
AppFactory = Callable[..., Awaitable[Served]]


def form(fields: dict[str, Any]) -> dict[str, Any]:
    """httpx keyword arguments posting `fields` as the role-play UI does (encodeURIComponent)."""
    body = "&".join(
        f"{quote(str(k), safe=_JS_SAFE)}={quote(str(v), safe=_JS_SAFE)}" for k, v in fields.items()
    )
    return {"content": body.encode(), "headers": {"Content-Type": "application/x-www-form-urlencoded"}}


def call(live: LiveServer, path: str, fields: dict[str, Any]) -> Any:
    """POST a role-play form to a live server; its `data`, the call having succeeded."""
    resp = httpx.post(f"{live.url}{path}", **form(fields), timeout=60)
    assert resp.status_code == 200, resp.text
    out = json.loads(resp.content)
    assert (out["message"], out["code"]) == ("success", 200), (path, out, log_tail(live.log))
    return out["data"]


def reply_frames(text: str) -> list[str]:
    """The cumulative texts of a role-play reply stream (`\\n\\ndata: <whole reply so far>` chunks)."""
    return text.split("\n\ndata: ")[1:]


#: The character the fault tests chat with (the UI's field set).
CARD = {
    "bot": "小雪",
    "user": "哥哥",
    "greeting": "你好, 来聊天吧。",
    "bot_persona": "你扮演{{char}}, 是{{user}}的邻居。",
    "example_message": "",
    "use_qa": "",
    "avatar": "",
}
GREEDY = {"tau": "3", "rate": "0.1", "min_p": "0.05", "temperature": "0", "presence_penalty": "0.2"}
