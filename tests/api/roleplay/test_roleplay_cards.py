"""SillyTavern character cards through `/characters/import` and `/characters/export`: V2 and V3 PNGs
built here, card JSON, and round trips that keep fields the role-play card has no place for."""

# ruff: noqa: RUF001

from __future__ import annotations

import base64
import json
import struct
import zlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from conftest import RP

SIG = b"\x89PNG\r\n\x1a\n"


def chunk(kind: bytes, body: bytes) -> bytes:
    return (
        struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    )


def png_with(keyword: str, card: dict[str, Any]) -> bytes:
    ihdr = struct.pack(">IIBBBBB", 2, 2, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"".join(b"\x00" + b"\x80\x40\x20" * 2 for _ in range(2)))
    text = keyword.encode() + b"\0" + base64.b64encode(json.dumps(card, ensure_ascii=False).encode())
    return SIG + chunk(b"IHDR", ihdr) + chunk(b"IDAT", pixels) + chunk(b"tEXt", text) + chunk(b"IEND", b"")


def text_chunks(png: bytes) -> dict[str, bytes]:
    out, pos = {}, len(SIG)
    while pos < len(png):
        (length,) = struct.unpack(">I", png[pos : pos + 4])
        kind, body = png[pos + 4 : pos + 8], png[pos + 8 : pos + 8 + length]
        if kind == b"tEXt":
            key, _, value = body.partition(b"\0")
            out[key.decode()] = value
        pos += 12 + length
    return out


V2 = {
    "spec": "chara_card_v2",
    "spec_version": "2.0",
    "data": {
        "name": "艾拉",
        "description": "{{char}}是一名旅行的吟游诗人。",
        "personality": "开朗",
        "scenario": "",
        "first_mes": "（拨了拨琴弦）你好，{{user}}！",
        "mes_example": "{{user}}: 唱首歌吧\n\n{{char}}: 好呀。",
        "tags": ["bard", "fantasy"],
        "creator": "someone",
        "character_book": {"entries": [{"keys": ["琴"], "content": "她的琴很旧。"}]},
        "extensions": {"depth_prompt": {"depth": 4, "prompt": "x"}},
        "unknown_field": {"kept": True},
    },
}
V3 = {
    "spec": "chara_card_v3",
    "spec_version": "3.0",
    "data": {
        **V2["data"],  # type: ignore[dict-item]
        "name": "米洛",
        "group_only_greetings": ["大家好"],
        "nickname": "小米",
    },
}


async def _import_png(rp: RP, me: dict[str, str], png: bytes) -> Any:
    resp = await rp.client.post("/characters/import", data=me, files={"file": ("card.png", png, "image/png")})
    return json.loads(resp.content)


async def test_v2_png_import_export_round_trip(rp: RP) -> None:
    me = await rp.guest()
    out = await _import_png(rp, me, png_with("chara", V2))
    assert out == {"data": {"char_name": "艾拉", "file_name": "艾拉.json"}, "message": "success", "code": 200}
    card = await rp.ok("/characters/get", {**me, "character_name": "艾拉"})
    assert card["bot"] == "艾拉"
    assert card["greeting"] == "（拨了拨琴弦）你好，{{user}}！"
    assert card["example_message"] == "{{user}}: 唱首歌吧\n\n{{char}}: 好呀。"
    assert card["bot_persona"].startswith("{{char}}是一名旅行的吟游诗人。") and "开朗" in card["bot_persona"]
    assert card["avatar"].startswith("data:image/png;base64,")
    # The imported character chats like any other.
    await rp.ok("/characters/load", {**me, "character_name": "艾拉"})

    resp = await rp.raw("/characters/export", {**me, "character_name": "艾拉", "format": "png"})
    assert resp.headers["content-type"] == "image/png"
    png = resp.content
    assert png.startswith(SIG)
    exported = json.loads(base64.b64decode(text_chunks(png)["chara"]))
    assert exported["spec"] == "chara_card_v2"
    data = exported["data"]
    for key in ("name", "description", "personality", "first_mes", "mes_example", "tags", "creator"):
        assert data[key] == V2["data"][key]  # type: ignore[index]
    assert data["character_book"] == V2["data"]["character_book"]  # type: ignore[index]
    assert data["unknown_field"] == {"kept": True}
    assert data["extensions"]["depth_prompt"] == {"depth": 4, "prompt": "x"}

    # Importing the export again gives the same character.
    other = await rp.guest()
    await _import_png(rp, other, png)
    again = await rp.ok("/characters/get", {**other, "character_name": "艾拉"})
    assert {k: again[k] for k in ("bot", "greeting", "bot_persona", "example_message")} == {
        k: card[k] for k in ("bot", "greeting", "bot_persona", "example_message")
    }


async def test_v3_png_and_json_cards(rp: RP) -> None:
    me = await rp.guest()
    out = await _import_png(rp, me, png_with("ccv3", V3))
    assert out["code"] == 200 and out["data"]["char_name"] == "米洛"
    resp = await rp.raw("/characters/export", {**me, "character_name": "米洛", "format": "json"})
    exported = json.loads(resp.content)
    assert exported["spec"] == "chara_card_v2"
    assert exported["data"]["nickname"] == "小米"
    assert exported["data"]["group_only_greetings"] == ["大家好"]
    # The card JSON as the body (with the credentials next to it) and as a `card` form field.
    resp = await rp.client.post("/characters/import", json={**me, **V2})
    assert json.loads(resp.content)["data"]["char_name"] == "艾拉"
    card2 = {**V2, "data": {**V2["data"], "name": "贝拉"}}  # type: ignore[dict-item]
    resp = await rp.raw("/characters/import", {**me, "card": json.dumps(card2, ensure_ascii=False)})
    assert json.loads(resp.content)["data"]["char_name"] == "贝拉"
    listing = await rp.ok("/characters/list", me)
    assert [e["char_name"] for e in listing["list"]] == ["星野", "米洛", "艾拉", "贝拉"]


async def test_bad_cards_get_the_envelope(rp: RP) -> None:
    me = await rp.guest()
    out = await _import_png(rp, me, b"not a card")
    assert out["code"] == 400 and out["message"].startswith("参数错误：")
    out = json.loads((await rp.raw("/characters/import", me)).content)
    assert (out["message"], out["code"]) == ("关键参数为空", 400)
    out = json.loads((await rp.raw("/characters/export", {**me, "character_name": "无"})).content)
    assert (out["message"], out["code"]) == ("角色不存在", 400)
