"""The role-play routes on the wire through the real app: envelopes byte for byte, every message in
the reference's order, form bodies as the Vue UI sends them, streams, CORS, the static UI."""

# ruff: noqa: RUF001

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from rwkv_gateway.services.users import UserService

if TYPE_CHECKING:
    from conftest import RP, Factory

from conftest import CARD, GREEDY, ui_body  # type: ignore[import-not-found]


def env(message: str, code: int) -> bytes:
    return json.dumps({"data": None, "message": message, "code": code}, ensure_ascii=False).encode()


async def test_error_envelope_bytes(rp: RP) -> None:
    resp = await rp.raw("/characters/list", {"token": "null"})
    assert resp.status_code == 200
    assert resp.content == '{"data": null, "message": "关键参数为空", "code": 400}'.encode()
    assert resp.headers["content-type"] == "application/json; charset=utf-8"


async def test_login_messages_in_order(rp: RP) -> None:
    await rp.app.state.services.users.add("sbin", "123456")
    assert (await rp.raw("/login", {"token": "null"})).content == env("缺少关键参数", 400)
    assert (await rp.raw("/login", {"user_name": "sbin", "password": ""})).content == env("缺少关键参数", 400)
    assert (await rp.raw("/login", {"user_name": "nobody", "password": "x"})).content == env(
        "用户不存在", 400
    )
    assert (await rp.raw("/login", {"user_name": "sbin", "password": "12345"})).content == env(
        "密码不正确", 400
    )
    first = await rp.ok("/login", {"user_name": "sbin", "password": "123456", "token": "null"})
    assert first["user_name"] == "sbin"
    assert (
        len(first["token"]) == 32
        and int(first["token"], 16) >= 0
        and first["token"] == first["token"].lower()
    )
    second = await rp.ok("/login", {"user_name": "sbin", "password": "123456", "token": first["token"]})
    assert second["token"] != first["token"]
    # One token per user: the first one is now stale (403 only here), the new one works.
    stale = await rp.raw("/characters/list", {"user_name": "sbin", "token": first["token"]})
    assert stale.content == env("token失效，请重新登录", 403)
    await rp.ok("/characters/list", {"user_name": "sbin", "token": second["token"]})


async def test_token_check_comes_first_and_selects_the_store(rp: RP) -> None:
    me = await rp.user("alice")
    # Bad token and no character_name: the token error wins.
    out = await rp.call("/characters/get", {"user_name": "alice", "token": "0" * 32})
    assert (out["message"], out["code"]) == ("token失效，请重新登录", 403)
    # A tmp- token speaks for the guest store, where alice does not exist.
    out = await rp.call("/characters/get", {"user_name": "alice", "token": "tmp-" + "0" * 32})
    assert (out["message"], out["code"]) == ("用户不存在", 400)
    out = await rp.call("/characters/get", {"user_name": "../alice", "token": me["token"]})
    assert (out["message"], out["code"]) == ("用户不存在", 400)
    out = await rp.call("/characters/get", {**me})
    assert (out["message"], out["code"]) == ("关键参数为空", 400)


async def test_guest_login_and_default_character(rp: RP) -> None:
    guest = await rp.guest()
    assert guest["user_name"] == guest["token"]
    assert guest["user_name"].startswith("tmp-") and len(guest["user_name"]) == 36
    listing = await rp.ok("/characters/list", guest)
    assert listing == {"list": [{"char_name": "星野", "file_name": "星野.json", "avatar": None}]}
    card = await rp.ok("/characters/get", {**guest, "character_name": "星野"})
    assert list(card) == ["user", "bot", "greeting", "bot_persona", "example_message", "use_qa", "avatar"]
    assert card["bot"] == "星野" and card["use_qa"] is False


async def test_defaults_never_overwrite_edits(rp: RP) -> None:
    me = await rp.user("bob")
    edited = {**CARD, "bot": "星野", "greeting": "改过的开场白"}
    await rp.ok("/characters/save", {**me, **edited})
    again = await rp.ok("/login", {"user_name": "bob", "password": "pw-123456"})
    me = {"user_name": "bob", "token": again["token"]}
    card = await rp.ok("/characters/get", {**me, "character_name": "星野"})
    assert card["greeting"] == "改过的开场白"
    await rp.ok("/characters/del", {**me, "character_name": "星野"})
    again = await rp.ok("/login", {"user_name": "bob", "password": "pw-123456"})
    # Given once: a deleted default does not come back.
    listing = await rp.ok("/characters/list", {"user_name": "bob", "token": again["token"]})
    assert listing == {"list": []}


async def test_character_save_get_list_del(rp: RP) -> None:
    me = await rp.guest()
    await rp.ok("/characters/save", {**me, **CARD})
    card = await rp.ok("/characters/get", {**me, "character_name": "小雪"})
    assert card == {
        "user": "哥哥",
        "bot": "小雪",
        "greeting": CARD["greeting"],
        "bot_persona": CARD["bot_persona"],
        "example_message": CARD["example_message"],
        "use_qa": False,
        "avatar": CARD["avatar"],
    }
    # use_qa: any non-empty string is true ("false" included); "null"/"undefined" texts become "".
    await rp.ok(
        "/characters/save",
        {**me, **CARD, "bot": "阿", "use_qa": "false", "example_message": "null", "avatar": "undefined"},
    )
    card = await rp.ok("/characters/get", {**me, "character_name": "阿"})
    assert (card["use_qa"], card["example_message"], card["avatar"]) == (True, "", None)
    listing = await rp.ok("/characters/list", me)
    assert [e["file_name"] for e in listing["list"]] == sorted(["星野.json", "小雪.json", "阿.json"])
    for missing in ("user", "bot", "greeting", "bot_persona"):
        fields = {**me, **CARD}
        del fields[missing]
        assert (await rp.raw("/characters/save", fields)).content == env("关键参数为空", 400)
    assert (await rp.raw("/characters/save", {**me, **CARD, "bot": "../x"})).content == env(
        "角色名称不合法", 400
    )
    big = "data:image/png;base64," + "A" * (2**20)
    assert (await rp.raw("/characters/save", {**me, **CARD, "avatar": big})).content == env(
        "头像图片过大", 400
    )
    await rp.ok("/characters/del", {**me, "character_name": "小雪"})
    await rp.ok("/characters/del", {**me, "character_name": "没有这个"})
    assert (await rp.raw("/characters/get", {**me, "character_name": "小雪"})).content == env(
        "角色不存在", 400
    )
    assert (await rp.raw("/characters/del", me)).content == env("关键参数为空", 400)


async def test_chat_preconditions(rp: RP) -> None:
    me = await rp.guest()
    c = {**me, "character_name": "星野"}
    assert (await rp.raw("/chat/reply", {**c, "prompt": "你好", **GREEDY})).content == env(
        "尚未加载角色", 400
    )
    assert (await rp.raw("/chat/reply", {**me, **GREEDY})).content == env("关键参数为空", 400)
    assert (await rp.raw("/chat/reply", {**c, "prompt": "  \n"})).content == env("关键参数为空", 400)
    assert (await rp.raw("/chat/resay", {**c, **GREEDY})).content == env("尚未加载角色", 400)
    assert (await rp.raw("/chat/tamper", {**c, "message": "x"})).content == env("尚未加载角色", 400)
    assert (await rp.raw("/chat/back", {**c, "log_index": "0"})).content == env("尚未加载角色", 400)
    assert (await rp.raw("/debug/token", c)).content == env("尚未开始对话", 400)
    assert (await rp.raw("/characters/load", {**me, "character_name": "无"})).content == env(
        "角色不存在", 400
    )
    assert (await rp.raw("/chat/reset", {**me, "character_name": "无"})).content == env("角色不存在", 400)
    assert (await rp.raw("/chat/back", {**me, "character_name": "无"})).content == env("角色不存在", 400)
    loaded = await rp.ok("/characters/load", c)
    greeting = "（合上手里的星图，抬头冲你笑了笑）旅人，今晚的星星很亮，要不要一起看看？"
    assert loaded == {"chat": [[None, greeting]]}
    assert await rp.ok("/characters/load", c) == loaded  # idempotent
    assert (await rp.raw("/chat/resay", {**c, **GREEDY})).content == env("尚未开始对话", 400)
    assert (await rp.raw("/chat/tamper", {**c, "message": "x"})).content == env("尚未开始对话", 400)
    assert (await rp.raw("/chat/back", {**c, "log_index": "1"})).content == env("回溯节点不存在", 400)
    # "1.0" is not an int: log_index 0, which exists.
    await rp.ok("/chat/back", {**c, "log_index": "1.0"})
    debug = await rp.ok("/debug/token", c)
    assert debug["token_state"].endswith(f"星野: {greeting}\n\n")
    assert debug["token_count"] == len(rp.app.state.services.model.engine.codec.encode(debug["token_state"]))


async def test_persona_block_text(rp: RP) -> None:
    me = await rp.guest()
    await rp.ok("/characters/save", {**me, **CARD})
    await rp.ok("/characters/load", {**me, "character_name": "小雪"})
    debug = await rp.ok("/debug/token", {**me, "character_name": "小雪"})
    # The persona block of docs/roleplay.md#12-prompt-text: examples, persona, greeting line.
    assert debug["token_state"] == (
        "哥哥: 你好\n\n小雪: （笑）你好呀，哥哥。\n\n你扮演小雪，是哥哥的邻居。\n\n"
        "小雪: （跑过来）{{user}}，来聊天吧。\n\n"
    )
    await rp.ok("/characters/save", {**me, **CARD, "use_qa": "1"})
    await rp.ok("/characters/load", {**me, "character_name": "小雪"})
    debug = await rp.ok("/debug/token", {**me, "character_name": "小雪"})
    assert debug["token_state"].endswith("\n\nAssistant: （跑过来）{{user}}，来聊天吧。\n\n")


async def test_query_wins_and_json_bodies(rp: RP) -> None:
    me = await rp.guest()
    # The query string wins over the form body.
    resp = await rp.client.post(
        "/characters/get?character_name=%E6%98%9F%E9%87%8E",
        content=ui_body({**me, "character_name": "无"}).encode(),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert json.loads(resp.content)["data"]["bot"] == "星野"
    # Repeated keys: the first wins.
    resp = await rp.client.post(
        "/characters/get",
        content=(ui_body(me) + "&character_name=%E6%98%9F%E9%87%8E&character_name=x").encode(),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert json.loads(resp.content)["data"]["bot"] == "星野"
    # Multipart forms and JSON objects work too.
    resp = await rp.client.post(
        "/characters/get", files={"character_name": (None, "星野"), **{k: (None, v) for k, v in me.items()}}
    )
    assert json.loads(resp.content)["data"]["bot"] == "星野"
    resp = await rp.client.post("/characters/get", json={**me, "character_name": "星野"})
    assert json.loads(resp.content)["data"]["bot"] == "星野"
    resp = await rp.client.post("/characters/get", json={**me, "character_name": None})
    assert resp.content == env("关键参数为空", 400)


async def test_unknown_method_path_and_oversized_body(rp_factory: Factory) -> None:
    rp = await rp_factory(max_body_bytes=4096)
    resp = await rp.client.get("/login")
    assert (resp.status_code, resp.content) == (200, env("请求方法不允许", 405))
    resp = await rp.raw("/characters/save", {"user_name": "x", "token": "y", "avatar": "A" * 8000})
    assert (resp.status_code, resp.content) == (200, env("请求内容过大", 413))
    # /chat alone is not a role-play path.
    assert (await rp.client.get("/chat/nothing")).status_code == 404


async def test_cors_on_every_response(rp: RP) -> None:
    origin = {"Origin": "http://127.0.0.1:9000"}
    resp = await rp.raw("/characters/list", {"token": "null"}, headers=origin)
    assert resp.headers["access-control-allow-origin"] == "http://127.0.0.1:9000"
    assert resp.headers["vary"] == "Origin"
    me = await rp.guest()
    c = {**me, "character_name": "星野"}
    await rp.ok("/characters/load", c)
    resp = await rp.raw("/chat/reply", {**c, "prompt": "你好", **GREEDY}, headers=origin)
    assert resp.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert resp.headers["access-control-allow-origin"] == "http://127.0.0.1:9000"
    resp = await rp.client.options("/chat/reply", headers={**origin, "Access-Control-Request-Method": "POST"})
    assert resp.status_code == 204
    assert resp.headers["access-control-allow-methods"] == "DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT"
    assert resp.headers["access-control-allow-origin"] == "http://127.0.0.1:9000"
    # Without an Origin there are no CORS headers; other dialects' paths are untouched.
    resp = await rp.raw("/characters/list", {"token": "null"})
    assert "access-control-allow-origin" not in resp.headers
    resp = await rp.client.get("/v1/models", headers=origin)
    assert "access-control-allow-origin" not in resp.headers


async def test_ui_dir_is_served_at_the_root(rp_factory: Factory, tmp_path: Path) -> None:
    ui = tmp_path / "dist"
    (ui / "js").mkdir(parents=True)
    (ui / "index.html").write_text("<!doctype html><title>ui</title>")
    (ui / "js" / "app.js").write_text("console.log(1)")
    rp = await rp_factory(ui_dir=ui)
    assert (await rp.client.get("/")).text == "<!doctype html><title>ui</title>"
    assert (await rp.client.get("/js/app.js")).text == "console.log(1)"
    await rp.guest()  # POST routes still answer
    assert (await rp.client.get("/v1/models")).status_code == 200


async def test_users_service_and_legacy_import(rp: RP, tmp_path: Path) -> None:
    legacy = tmp_path / "legacy"
    (legacy / "user").mkdir(parents=True)
    (legacy / "chars").mkdir()
    (legacy / "user" / "sbin").write_text("123456\n")
    (legacy / "chars" / "小雪.json").write_text(
        json.dumps({k: v for k, v in CARD.items() if k != "use_qa"} | {"use_qa": False}, ensure_ascii=False)
    )
    users: UserService = rp.app.state.services.users
    names, n_chars = await users.import_legacy(legacy)
    assert (names, n_chars) == (["sbin"], 1)
    data = await rp.ok("/login", {"user_name": "sbin", "password": "123456"})
    me = {"user_name": "sbin", "token": data["token"]}
    listing = await rp.ok("/characters/list", me)
    assert [e["char_name"] for e in listing["list"]] == ["小雪", "星野"]
    assert [u.name for u in await users.list()] == ["sbin"]
    await users.delete("sbin")
    assert (await rp.raw("/characters/list", me)).content == env("用户不存在", 400)
