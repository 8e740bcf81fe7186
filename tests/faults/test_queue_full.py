"""A full queue is answered at once, in every dialect's own format: the one batch slot is held by a
request whose sampler blocks the model thread (fault injection), the one queue place by a second
request, and then each dialect's generating routes are asked for more."""

# ruff: noqa: RUF001  (the role-play messages use full-width punctuation)

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import httpx
from live import CARD, GREEDY, AppFactory, form

if TYPE_CHECKING:
    from tests.conftest import FullQueue

WENXIN_CHAT = "/rpc/2.0/ai_custom/v1/wenxinworkshop/chat/rwkv"
ROLEPLAY_BUSY = {"data": None, "message": "服务器繁忙，请稍后再试", "code": 503}


def retry_after(resp: httpx.Response) -> None:
    assert int(resp.headers["retry-after"]) >= 1


async def test_every_dialect_answers_a_full_queue_in_its_own_format(
    app_factory: AppFactory, full_queue: FullQueue, record_property: Callable[[str, object], None]
) -> None:
    app = await app_factory(queue_size=1, max_batch_size=1, roleplay_max_reply_tokens=4)
    c = app.client
    engine = app.app.state.services.model.engine
    model = engine.info.name
    # Accounts first (a Baidu token, a role-play guest with an opened chat), while the engine is free.
    created = await app.app.state.services.credentials.create("baidu", "faults")
    token_url = (
        f"/oauth/2.0/token?grant_type=client_credentials&client_id={created.api_key}"
        f"&client_secret={created.secret_key}"
    )
    wenxin_token = (await c.post(token_url, json={})).json()["access_token"]
    guest = json.loads((await c.post("/login/tmp", **form({"token": "null"}))).content)["data"]
    chat_fields = {"user_name": guest["user_name"], "token": guest["token"], "character_name": CARD["bot"]}
    auth = {"user_name": guest["user_name"], "token": guest["token"]}
    assert json.loads((await c.post("/characters/save", **form({**auth, **CARD}))).content)["code"] == 200
    opened = json.loads((await c.post("/characters/load", **form(chat_fields))).content)["data"]

    asked = 0

    async def ask(method: str, path: str, **kw: Any) -> httpx.Response:
        nonlocal asked
        asked += 1
        return await c.request(method, path, **kw)

    async with full_queue(engine):
        # OpenAI: 503 `overloaded` (type server_error) with Retry-After, streams included.
        chat = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
        text = {"model": model, "prompt": "Hi", "max_tokens": 4}
        for path, body in [
            ("/v1/chat/completions", chat),
            ("/v1/chat/completions", {**chat, "stream": True}),
            ("/v1/completions", text),
            ("/v1/completions", {**text, "stream": True}),
            ("/v1/embeddings", {"model": model, "input": "Hi"}),
        ]:
            resp = await ask("POST", path, json=body)
            assert resp.status_code == 503, (path, resp.text)
            error = resp.json()["error"]
            assert (error["code"], error["type"]) == ("overloaded", "server_error"), (path, error)
            retry_after(resp)
        # ChatGLM: 503 {"detail": "server busy"} with Retry-After.
        for path, body in [
            ("/chat", {"prompt": "Hi"}),
            ("/chat-stream", {"prompt": "Hi"}),
            ("/embedding", {"prompt": ["Hi"]}),
        ]:
            resp = await ask("POST", path, json=body)
            assert (resp.status_code, resp.json()) == (503, {"detail": "server busy"}), path
            retry_after(resp)
        # Baidu: HTTP 200 with the retryable 336100, streams included.
        for stream in (False, True):
            body = {"messages": [{"role": "user", "content": "Hi"}], "stream": stream}
            resp = await ask("POST", f"{WENXIN_CHAT}?access_token={wenxin_token}", json=body)
            assert resp.status_code == 200
            assert resp.headers["content-type"].startswith("application/json")
            error = resp.json()
            assert error["error_code"] == 336100, error
            assert "try again later" in error["error_msg"]
            retry_after(resp)
        # Role-play: HTTP 200, the envelope with code 503 (streamed replies included).
        for path, extra in [
            ("/chat/reply", {"prompt": "你好", **GREEDY}),
            ("/chat/reply", {"prompt": "你好", **GREEDY, "stream": "0"}),
        ]:
            resp = await ask("POST", path, **form({**chat_fields, **extra}))
            assert resp.status_code == 200
            assert json.loads(resp.content) == ROLEPLAY_BUSY, path
        # Task API: 503 {"detail": ...} with Retry-After.
        resp = await ask("POST", "/v1/tasks/tmp", json={"prompt": "Hello", "max_tokens": 5})
        assert (resp.status_code, resp.json()) == (503, {"detail": "the request queue is full (1 waiting)"})
        retry_after(resp)
        # A full queue is load, not a failure: readiness stays 200; nothing extra was admitted.
        assert (await c.get("/readyz")).status_code == 200
        assert engine.stats()["queue_depth"] == 1
    # Nothing of the refused turns was stored, and everything works again.
    after = json.loads((await c.post("/characters/load", **form(chat_fields))).content)["data"]
    assert after == opened
    assert (await c.post("/v1/chat/completions", json={**chat, "max_tokens": 2})).status_code == 200
    record_property(
        "figure", f"queue full: {asked} requests over 5 dialects, {asked} busy answers, 0 admitted"
    )
