"""Hostile input, dialect by dialect: oversized bodies, deeply nested JSON, invalid UTF-8, NaN and
infinity, huge token limits, control characters, path-like and SQL-like names. Each is refused with
a clear 4xx-class error in the envelope of the dialect that was asked (Baidu and role-play say it in
a 200, as their originals do), and nothing of it is stored: no generation, no task, no request-log
row, no state file, no character. SQL-like strings are data: stored verbatim where a name may hold
them, and the tables are intact afterwards.
"""

# ruff: noqa: RUF001  (the role-play messages use full-width punctuation)

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import httpx
import pytest

if TYPE_CHECKING:
    from conftest import Served, ServeFactory

LIMIT = 256 * 1024
MAX_NEW = 8
WENXIN_CHAT = "/rpc/2.0/ai_custom/v1/wenxinworkshop/chat/rwkv"
#: Nested far past Python's recursion limit, yet well inside the body limit.
DEEP = "[" * 20000 + "]" * 20000
_JS_SAFE = "-_.!~*'()"


@dataclass
class Dialect:
    name: str
    path: str
    body: dict[str, Any]
    temperature: str
    max_tokens: str


def dialects(model: str, wenxin_token: str) -> list[Dialect]:
    hi = [{"role": "user", "content": "hi"}]
    return [
        Dialect(
            "openai",
            "/v1/chat/completions",
            {"model": model, "messages": hi, "max_tokens": 2},
            "temperature",
            "max_tokens",
        ),
        Dialect("glm", "/chat", {"prompt": "hi", "max_length": 64}, "temperature", "max_length"),
        Dialect(
            "wenxin",
            f"{WENXIN_CHAT}?access_token={wenxin_token}",
            {"messages": hi, "max_output_tokens": 2},
            "temperature",
            "max_output_tokens",
        ),
        Dialect("tasks", "/v1/tasks/tmp", {"prompt": "hi", "max_tokens": 2}, "temperature", "max_tokens"),
    ]


def hostile_bodies(d: Dialect) -> dict[str, bytes]:
    plain = json.dumps(d.body)
    return {
        "oversized body": json.dumps({**d.body, "pad": "x" * (LIMIT + 1)}).encode(),
        "invalid UTF-8": plain.encode()[:-1] + b', "junk": "\xff\xfe\xc3("}',
        "NaN": json.dumps({**d.body, d.temperature: float("nan")}).encode(),
        "infinity": json.dumps({**d.body, d.temperature: float("-inf")}).encode(),
        "huge max tokens": json.dumps({**d.body, d.max_tokens: 10**15}).encode(),
        "not an object": b'"\\u0000"',
    }


def assert_refused(d: Dialect, kind: str, resp: httpx.Response) -> str:
    """The dialect's error envelope, 4xx-class; returns its message."""
    what = (d.name, kind, resp.status_code, resp.text[:300])
    assert resp.headers["content-type"].startswith("application/json"), what
    body = resp.json()
    if d.name == "wenxin":
        assert resp.status_code == 200, what
        assert set(body) >= {"error_code", "error_msg"} and "result" not in body, what
        assert body["error_code"] in (336001, 336002, 336003, 336006), (
            what
        )  # bad argument / JSON / value / too large
        return str(body["error_msg"])
    assert 400 <= resp.status_code < 500, what
    if d.name == "openai":
        assert set(body) == {"error"} and body["error"]["type"] == "invalid_request_error", what
        return str(body["error"]["message"])
    assert set(body) == {"detail"}, what
    detail = body["detail"]
    if isinstance(detail, list):  # the Task API's FastAPI-style 422
        assert d.name == "tasks" and resp.status_code == 422 and detail, what
        return str(detail[0]["msg"])
    assert isinstance(detail, str) and detail, what
    return detail


def db_counts(served: Served) -> dict[str, int]:
    with contextlib.closing(sqlite3.connect(served.settings.data_dir / "gateway.db")) as db:
        return {
            table: db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            for table in (
                "users",
                "characters",
                "conversations",
                "conversation_nodes",
                "request_log",
                "tasks",
            )
        }


def state_files(served: Served) -> list[str]:
    return sorted(str(p) for p in served.settings.state_dir.rglob("*") if p.is_file())


async def wenxin_token(served: Served) -> str:
    created = await served.app.state.services.credentials.create("baidu", "hostile")
    resp = await served.client.post(
        f"/oauth/2.0/token?grant_type=client_credentials&client_id={created.api_key}"
        f"&client_secret={created.secret_key}",
        json={},
    )
    return str(resp.json()["access_token"])


@pytest.mark.parametrize("dialect", ["openai", "glm", "wenxin", "tasks"])
async def test_hostile_json_is_refused_in_the_envelope_and_nothing_is_stored(
    serve: ServeFactory, dialect: str, record_property: Callable[[str, object], None]
) -> None:
    served = await serve(max_body_bytes=LIMIT, max_new_tokens=MAX_NEW)
    d = next(x for x in dialects(served.model, await wenxin_token(served)) if x.name == dialect)
    engine = served.app.state.services.model.engine
    before, files = db_counts(served), state_files(served)
    requests_before = engine.stats()["requests"]
    refused = 0
    for kind, content in hostile_bodies(d).items():
        if dialect == "glm" and kind == "huge max tokens":
            continue  # GLM's max_length is a total length, capped by the server (checked below)
        resp = await served.client.post(d.path, content=content, headers={"content-type": "application/json"})
        assert_refused(d, kind, resp)
        refused += 1
    # Nothing was generated or stored.
    assert engine.stats()["requests"] == requests_before
    assert db_counts(served) == before
    assert state_files(served) == files
    if dialect == "glm":
        # A huge max_length is HuggingFace's total length, bounded by the server's max_new_tokens.
        resp = await served.client.post("/chat", json={**d.body, "max_length": 10**15, "temperature": 0})
        assert resp.status_code == 200, resp.text
        assert len(engine.codec.encode(resp.json()["content"])) <= MAX_NEW
    record_property(
        "figure",
        f"hostile JSON ({dialect}): {refused} hostile bodies, {refused} refused in its envelope, 0 stored",
    )


@pytest.mark.parametrize(
    "dialect",
    [
        "openai",
        "glm",
        "wenxin",
        "tasks",
        "roleplay",
    ],
)
async def test_deeply_nested_json_is_a_clear_error(
    serve: ServeFactory, dialect: str, record_property: Callable[[str, object], None]
) -> None:
    """Nesting past the parser's recursion limit (a RecursionError, not a ValueError) is bad JSON."""
    served = await serve(max_body_bytes=LIMIT)
    if dialect == "roleplay":
        guest = envelope(await served.client.post("/login/tmp", **form({"token": "null"})))["data"]
        before = db_counts(served)
        body = (
            '{"nested": '
            + DEEP
            + f', "user_name": "{guest["user_name"]}", "token": "{guest["token"]}", "bot": "深"}}'
        )
        resp = await served.client.post(
            "/characters/save", content=body.encode(), headers={"content-type": "application/json"}
        )
        out = envelope(resp)
        assert 400 <= out["code"] < 500, out
        assert db_counts(served)["characters"] == before["characters"]
        record_property("figure", "deep JSON (roleplay): refused in the envelope, 0 stored")
        return
    d = next(x for x in dialects(served.model, await wenxin_token(served)) if x.name == dialect)
    before = db_counts(served)
    content = ('{"nested": ' + DEEP + ", " + json.dumps(d.body)[1:]).encode()
    assert_refused(
        d,
        "deeply nested JSON",
        await served.client.post(d.path, content=content, headers={"content-type": "application/json"}),
    )
    if dialect == "glm":  # the shared /tokenize reads its body by hand too
        resp = await served.client.post("/tokenize", content=b'{"prompt": ' + DEEP.encode() + b"}")
        assert resp.status_code == 400 and set(resp.json()) == {"detail"}, resp.text
    assert db_counts(served) == before
    record_property("figure", f"deep JSON ({dialect}): refused in its envelope, 0 stored")


# ---------------------------------------------------------------------------- role-play names


def form(fields: dict[str, Any]) -> dict[str, Any]:
    body = "&".join(
        f"{quote(str(k), safe=_JS_SAFE)}={quote(str(v), safe=_JS_SAFE)}" for k, v in fields.items()
    )
    return {"content": body.encode(), "headers": {"Content-Type": "application/x-www-form-urlencoded"}}


CARD = {
    "user": "哥哥",
    "greeting": "你好",
    "bot_persona": "邻居",
    "example_message": "",
    "use_qa": "",
    "avatar": "",
}
BAD_NAMES = {
    "control characters": "a\x00b\x1b[31m",
    "newline": "小雪\n",
    "path-like": "../../etc/passwd",
    "absolute path": "/etc/passwd",
    "backslash path": "..\\..\\boot.ini",
    "dot": "..",
    "empty": "",
}
SQL_LIKE = "x'); DROP TABLE users;--"


def envelope(resp: httpx.Response) -> dict[str, Any]:
    assert resp.status_code == 200
    out: dict[str, Any] = json.loads(resp.content)
    assert list(out) == ["data", "message", "code"], out
    return out


async def test_roleplay_hostile_names_are_refused_and_sql_is_data(
    serve: ServeFactory, record_property: Callable[[str, object], None]
) -> None:
    served = await serve(max_body_bytes=LIMIT)
    c = served.client
    guest = envelope(await c.post("/login/tmp", **form({"token": "null"})))["data"]
    auth = {"user_name": guest["user_name"], "token": guest["token"]}
    listed = envelope(await c.post("/characters/list", **form(auth)))["data"]["list"]
    before, files = db_counts(served), state_files(served)
    refused = 0
    for kind, name in BAD_NAMES.items():
        out = envelope(await c.post("/characters/save", **form({**auth, **CARD, "bot": name})))
        assert 400 <= out["code"] < 500 and out["data"] is None, (kind, out)
        refused += 1
        out = envelope(await c.post("/characters/load", **form({**auth, "character_name": name})))
        assert 400 <= out["code"] < 500, (kind, out)
        refused += 1
        out = envelope(await c.post("/login", **form({"user_name": name, "password": "x", "token": "null"})))
        assert 400 <= out["code"] < 500, (kind, out)
        refused += 1
    # Hostile bodies in the form dialect: oversized, invalid UTF-8 (percent-encoded and raw).
    out = envelope(
        await c.post("/characters/save", **form({**auth, **CARD, "bot": "大", "bot_persona": "x" * LIMIT}))
    )
    assert out["code"] == 413, out
    raw = f"user_name={auth['user_name']}&token={auth['token']}&bot=%ff%fe&user=a&greeting=b".encode()
    out = envelope(
        await c.post(
            "/characters/save", content=raw, headers={"Content-Type": "application/x-www-form-urlencoded"}
        )
    )
    assert 400 <= out["code"] < 500, out
    out = envelope(
        await c.post(
            "/characters/save",
            content=raw.replace(b"%ff%fe", b"\xff\xfe"),
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
    )
    assert 400 <= out["code"] < 500, out
    refused += 3
    assert envelope(await c.post("/characters/list", **form(auth)))["data"]["list"] == listed
    assert db_counts(served) == before
    assert state_files(served) == files
    # SQL-like text is a legal name: stored verbatim, and the tables are intact.
    assert (
        envelope(await c.post("/characters/save", **form({**auth, **CARD, "bot": SQL_LIKE})))["code"] == 200
    )
    names = [x["char_name"] for x in envelope(await c.post("/characters/list", **form(auth)))["data"]["list"]]
    assert SQL_LIKE in names
    after = db_counts(served)
    assert after["users"] == before["users"] and after["characters"] == before["characters"] + 1
    out = envelope(
        await c.post("/login", **form({"user_name": SQL_LIKE, "password": "' OR '1'='1", "token": "null"}))
    )
    assert out["code"] == 400, out
    record_property(
        "figure",
        f"hostile role-play input: {refused} hostile names/bodies, {refused} refused in the envelope, "
        "0 stored; SQL-like name stored verbatim, tables intact",
    )


# ---------------------------------------------------------------------------- who may do what
#
# Already covered elsewhere (not repeated here), under tests/:
#   token replay after re-login (one route)   api/roleplay/test_roleplay_wire.py
#                                             ::test_login_messages_in_order
#   isolation on get/reply/debug/del/list     api/roleplay/test_roleplay_chat.py
#                                             ::test_users_cannot_see_each_other
#   idle guests removed with their data       api/roleplay/test_roleplay_chat.py::test_idle_guests_are_removed
#   Baidu signature outside its time window   api/wenxin/test_wenxin_wire.py ("stale timestamp"),
#                                             api/wenxin/test_wenxin_signature.py::test_time_window
#   Baidu revoked AK/SK and access tokens     api/wenxin/test_wenxin_wire.py
#                                             ::test_revoked_iam_credentials_are_refused,
#                                             ::test_missing_unknown_expired_and_revoked_tokens
#   OpenAI key revocation (service, CLI)      unit/test_credentials.py::test_revoke_openai_key,
#                                             test_cli_keys.py

ROLEPLAY_ROUTES: dict[str, dict[str, str]] = {
    "/characters/list": {},
    "/characters/get": {"character_name": "小雪"},
    "/characters/save": {**CARD, "bot": "小雪", "greeting": "被改了"},
    "/characters/del": {"character_name": "小雪"},
    "/characters/load": {"character_name": "小雪"},
    "/chat/reply": {"character_name": "小雪", "prompt": "偷看", "temperature": "0"},
    "/chat/resay": {"character_name": "小雪", "temperature": "0"},
    "/chat/reset": {"character_name": "小雪"},
    "/chat/back": {"character_name": "小雪", "log_index": "0"},
    "/chat/tamper": {"character_name": "小雪", "message": "被改了"},
    "/debug/token": {"character_name": "小雪"},
    "/characters/export": {"character_name": "小雪", "format": "json"},
    "/characters/import": {
        "card": json.dumps({"spec": "chara_card_v2", "data": {"name": "小雪", "first_mes": "被改了"}})
    },
}
STALE = {"data": None, "message": "token失效，请重新登录", "code": 403}


async def test_every_roleplay_route_refuses_other_users_and_replayed_tokens(
    serve: ServeFactory, record_property: Callable[[str, object], None]
) -> None:
    served = await serve(roleplay_max_reply_tokens=4)
    c = served.client
    users = served.app.state.services.users
    await users.add("anna", "pw-anna-1")
    await users.add("ben", "pw-ben-12")

    async def login(name: str, password: str) -> dict[str, str]:
        data = envelope(
            await c.post("/login", **form({"user_name": name, "password": password, "token": "null"}))
        )
        return {"user_name": data["data"]["user_name"], "token": data["data"]["token"]}

    old_anna = await login("anna", "pw-anna-1")
    anna = await login("anna", "pw-anna-1")  # the first token is now a replay
    ben = await login("ben", "pw-ben-12")
    assert envelope(await c.post("/characters/save", **form({**anna, **CARD, "bot": "小雪"})))["code"] == 200
    mine = {**anna, "character_name": "小雪"}
    envelope(await c.post("/characters/load", **form(mine)))
    await c.post("/chat/reply", **form({**mine, "prompt": "秘密", "temperature": "0", "stream": "0"}))
    card = envelope(await c.post("/characters/get", **form(mine)))["data"]
    chat = envelope(await c.post("/characters/load", **form(mine)))["data"]
    refused = 0
    for path, fields in ROLEPLAY_ROUTES.items():
        # Ben's token under Anna's name, and Anna's replayed token: refused before anything happens.
        for creds in ({"user_name": "anna", "token": ben["token"]}, old_anna):
            resp = await c.post(path, **form({**creds, **fields}))
            assert json.loads(resp.content) == STALE, (path, creds, resp.content[:200])
            refused += 1
        # Ben on his own account, naming Anna's character: only ever his own store.
        await c.post(path, **form({**ben, **fields}))
    assert envelope(await c.post("/characters/get", **form(mine)))["data"] == card
    assert envelope(await c.post("/characters/load", **form(mine)))["data"] == chat
    assert chat["chat"][-1][0] == "秘密"

    # OpenAI keys: a revoked key is refused on the OpenAI and the Task API routes at once.
    created = await served.app.state.services.credentials.create("openai", "to-revoke")
    served.app.state.services.openai_keys.forget()  # the short cache of "are there keys?"
    auth = {"authorization": f"Bearer {created.api_key}"}
    assert (await c.get("/v1/models", headers=auth)).status_code == 200
    assert (await c.get("/v1/tasks/list", headers=auth)).status_code == 200
    assert await served.app.state.services.credentials.revoke(created.api_key)
    resp = await c.get("/v1/models", headers=auth)
    assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key", resp.text
    resp = await c.post(
        "/v1/chat/completions",
        headers=auth,
        json={"model": served.model, "messages": [{"role": "user", "content": "hi"}]},
    )
    assert resp.status_code == 401, resp.text
    resp = await c.get("/v1/tasks/list", headers=auth)
    assert (resp.status_code, resp.json()) == (401, {"detail": "Incorrect API key provided."})
    refused += 3
    record_property(
        "figure",
        f"authorization: {len(ROLEPLAY_ROUTES)} role-play routes x (other user's token, replayed token) "
        f"and a revoked OpenAI key: {refused} refused, other user's data untouched",
    )
