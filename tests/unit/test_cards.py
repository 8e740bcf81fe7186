"""SillyTavern character-card codec: PNG/JSON, V1/V2/V3, round trips, hostile input.

PNGs are built here with a minimal writer of the test's own (not the module's), and exported PNGs are
read back with the test's own chunk reader, so the module is checked against the PNG format itself.
"""

from __future__ import annotations

import base64
import copy
import json
import struct
import zlib
from typing import Any

import pytest

from rwkv_gateway.domain.cards import CardCharacter, card_json_v2, card_png_v2, parse_card
from rwkv_gateway.errors import InvalidParameter

SIG = b"\x89PNG\r\n\x1a\n"


# --- the test's own PNG writer / reader --------------------------------------------------------------


def chunk(ctype: bytes, body: bytes) -> bytes:
    return (
        len(body).to_bytes(4, "big")
        + ctype
        + body
        + (zlib.crc32(ctype + body) & 0xFFFFFFFF).to_bytes(4, "big")
    )


def image_chunks(width: int = 2, height: int = 1) -> list[bytes]:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # RGB
    rows = b"".join(b"\x00" + bytes([200, 10, 30]) * width for _ in range(height))
    return [chunk(b"IHDR", ihdr), chunk(b"IDAT", zlib.compress(rows))]


def plain_png() -> bytes:
    return SIG + b"".join(image_chunks()) + chunk(b"IEND", b"")


def png_with(*text_chunks: bytes, trailing: bytes = b"") -> bytes:
    head, idat = image_chunks()
    # text chunks may sit anywhere between IHDR and IEND: put them before IDAT here, while the module
    # (like SillyTavern) writes its chunk after it, so both placements are covered
    return SIG + head + b"".join(text_chunks) + idat + chunk(b"IEND", b"") + trailing


def b64json(card: Any) -> bytes:
    return base64.b64encode(json.dumps(card).encode("utf-8"))


def text(keyword: str, card: Any) -> bytes:
    return chunk(b"tEXt", keyword.encode("latin-1") + b"\0" + b64json(card))


def ztxt(keyword: str, card: Any) -> bytes:
    return chunk(b"zTXt", keyword.encode("latin-1") + b"\0\0" + zlib.compress(b64json(card)))


def itxt(keyword: str, card: Any, *, compressed: bool) -> bytes:
    payload = zlib.compress(b64json(card)) if compressed else b64json(card)
    flag = b"\x01\x00" if compressed else b"\x00\x00"
    return chunk(b"iTXt", keyword.encode("latin-1") + b"\0" + flag + b"en\0Chara\0" + payload)


def read_chunks(png: bytes) -> list[tuple[bytes, bytes]]:
    assert png[:8] == SIG
    out, pos = [], 8
    while pos < len(png):
        (length,) = struct.unpack(">I", png[pos : pos + 4])
        ctype, body = png[pos + 4 : pos + 8], png[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", png[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(ctype + body) & 0xFFFFFFFF
        out.append((ctype, body))
        pos += 12 + length
    assert pos == len(png)
    return out


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


# --- sample cards ------------------------------------------------------------------------------------


def v2_card() -> dict[str, Any]:
    return {
        "name": "Aria",
        "description": "{{char}} is a ship's navigator.",
        "personality": "calm, dry humour",
        "scenario": "",
        "first_mes": "*looks up from the charts* Ah, {{user}}.",
        "mes_example": "<START>\n{{user}}: Where are we?\n{{char}}: Lost, as usual.",
        "creatorcomment": "top-level ST field",
        "avatar": "none",
        "talkativeness": "0.5",
        "fav": False,
        "tags": ["sea"],
        "create_date": "2024-1-1 @10h 00m 00s 000ms",
        "spec": "chara_card_v2",
        "spec_version": "2.0",
        "data": {
            "name": "Aria",
            "description": "{{char}} is a ship's navigator.",
            "personality": "calm, dry humour",
            "scenario": "",
            "first_mes": "*looks up from the charts* Ah, {{user}}.",
            "mes_example": "<START>\n{{user}}: Where are we?\n{{char}}: Lost, as usual.",
            "creator_notes": "notes",
            "system_prompt": "",
            "post_history_instructions": "",
            "tags": ["sea", "navigator"],
            "creator": "someone",
            "character_version": "1.2",
            "alternate_greetings": ["Hello again.", "Land ho!"],
            "character_book": {"name": "lore", "entries": [{"keys": ["map"], "content": "The map is old."}]},
            "extensions": {"talkativeness": "0.5", "fav": False, "world": "", "depth_prompt": {"depth": 4}},
            "x_unknown": {"nested": [1, 2, 3]},
        },
    }


def v3_card() -> dict[str, Any]:
    data = copy.deepcopy(v2_card()["data"])
    data.update(
        name="Bram",
        description="A blacksmith.",
        personality="",
        scenario="A village forge at dawn.",
        first_mes="The hammer rings.",
        mes_example="",
        nickname="Brammy",
        creator_notes_multilingual={"fr": "notes"},
        source=["https://example.invalid/bram"],
        group_only_greetings=[],
        creation_date=1700000000,
        modification_date=1700000001,
        assets=[{"type": "icon", "uri": "ccdefault:", "name": "main", "ext": "png"}],
    )
    return {"spec": "chara_card_v3", "spec_version": "3.0", "data": data}


def v1_card() -> dict[str, Any]:
    return {
        "name": "Cole",
        "description": "A detective.",
        "personality": "gruff",
        "scenario": "Rainy city, 1947.",
        "first_mes": "Door's open.",
        "mes_example": "{{char}}: Talk.",
        "metadata": {"version": 1},
    }


def same_character(a: CardCharacter, b: CardCharacter) -> None:
    assert (a.name, a.persona, a.greeting, a.example_message, a.user_alias, a.avatar) == (
        b.name,
        b.persona,
        b.greeting,
        b.example_message,
        b.user_alias,
        b.avatar,
    )


def bad(data: bytes, **kwargs: Any) -> str:
    with pytest.raises(InvalidParameter) as info:
        parse_card(data, **kwargs)
    assert info.value.param == "card"
    return info.value.message


# --- parsing -----------------------------------------------------------------------------------------


def test_v2_png_maps_fields_and_avatar_is_the_image_without_text_chunks() -> None:
    card = v2_card()
    other = chunk(b"tEXt", b"Software\0paint")
    ch = parse_card(png_with(other, text("chara", card), trailing=b"junk after IEND"))
    assert ch.name == "Aria"
    assert ch.persona == "{{char}} is a ship's navigator.\n\nPersonality: calm, dry humour"
    assert ch.greeting == "*looks up from the charts* Ah, {{user}}."
    assert ch.example_message == "<START>\n{{user}}: Where are we?\n{{char}}: Lost, as usual."
    assert ch.user_alias == ""
    assert ch.avatar == data_url(plain_png())
    assert ch.extra == card


def test_v3_png_prefers_ccv3_over_chara() -> None:
    legacy = v2_card()
    ch = parse_card(png_with(text("chara", legacy), text("ccv3", v3_card())))
    assert ch.name == "Bram"
    assert ch.persona == "A blacksmith.\n\nScenario: A village forge at dawn."
    assert ch.greeting == "The hammer rings."
    assert ch.example_message == ""
    assert ch.extra == v3_card()
    assert ch.avatar == data_url(plain_png())


def test_broken_ccv3_falls_back_to_chara_and_keywords_ignore_case() -> None:
    broken = chunk(b"tEXt", b"ccv3\0not base64 at all!!")
    ch = parse_card(png_with(broken, text("Chara", v2_card())))
    assert ch.name == "Aria"
    assert bad(png_with(broken)) == "card PNG text chunk is not valid base64"


@pytest.mark.parametrize(
    "make",
    [
        lambda c: itxt("chara", c, compressed=False),
        lambda c: itxt("chara", c, compressed=True),
        lambda c: ztxt("chara", c),
        lambda c: itxt("ccv3", c, compressed=True),
    ],
    ids=["iTXt", "iTXt-zlib", "zTXt", "iTXt-ccv3"],
)
def test_compressed_and_international_text_chunks(make: Any) -> None:
    ch = parse_card(png_with(make(v2_card())))
    assert (ch.name, ch.greeting) == ("Aria", "*looks up from the charts* Ah, {{user}}.")
    assert ch.avatar == data_url(plain_png())


def test_base64_without_padding_or_with_line_breaks_is_accepted() -> None:
    raw = b64json(v1_card())
    unpadded = raw.rstrip(b"=") + b"\n"
    wrapped = b"\n".join(raw[i : i + 76] for i in range(0, len(raw), 76))
    for payload in (unpadded, wrapped):
        assert parse_card(png_with(chunk(b"tEXt", b"chara\0" + payload))).name == "Cole"


def test_json_v1_is_wrapped_as_v2_and_keeps_unknown_keys() -> None:
    ch = parse_card(json.dumps(v1_card()).encode())
    assert ch.name == "Cole"
    assert ch.persona == "A detective.\n\nPersonality: gruff\n\nScenario: Rainy city, 1947."
    assert (ch.greeting, ch.example_message, ch.avatar) == ("Door's open.", "{{char}}: Talk.", None)
    assert ch.extra["spec"] == "chara_card_v2"
    assert ch.extra["metadata"] == {"version": 1}
    assert ch.extra["data"] == {
        "name": "Cole",
        "description": "A detective.",
        "personality": "gruff",
        "scenario": "Rainy city, 1947.",
        "first_mes": "Door's open.",
        "mes_example": "{{char}}: Talk.",
        "creator_notes": "",
        "system_prompt": "",
        "post_history_instructions": "",
        "alternate_greetings": [],
        "tags": [],
        "creator": "",
        "character_version": "",
        "extensions": {},
    }


def test_json_v2_v3_with_bom_and_pre_v1_field_names() -> None:
    v2 = parse_card(b"\xef\xbb\xbf  \n" + json.dumps(v2_card(), ensure_ascii=False).encode())
    assert (v2.name, v2.extra) == ("Aria", v2_card())
    v3 = parse_card(json.dumps(v3_card()).encode())
    assert (v3.name, v3.extra) == ("Bram", v3_card())
    old = {"char_name": "Dot", "char_persona": "Tiny.", "char_greeting": "Hi!", "example_dialogue": "x"}
    ch = parse_card(json.dumps(old).encode())
    assert (ch.name, ch.persona, ch.greeting, ch.example_message) == ("Dot", "Tiny.", "Hi!", "x")
    assert "char_name" not in ch.extra
    assert card_json_v2(ch)["name"] == "Dot"


def test_unicode_survives_png_and_json() -> None:
    greeting = "你好 {{user}} 🌸 café"
    card = v2_card()
    card["data"].update(name="小雪", first_mes=greeting)
    ch = parse_card(png_with(text("chara", card)))
    assert (ch.name, ch.greeting) == ("小雪", greeting)
    again = parse_card(card_png_v2(ch))
    assert (again.name, again.greeting) == ("小雪", greeting)


def test_json_avatar_from_data_field_or_v3_main_icon() -> None:
    url = data_url(plain_png())
    card = v2_card()
    card["data"]["avatar"] = url
    assert parse_card(json.dumps(card).encode()).avatar == url
    v3 = v3_card()
    v3["data"]["assets"] = [
        {"type": "background", "uri": "data:image/png;base64,AAAA", "name": "main", "ext": "png"},
        {"type": "icon", "uri": url, "name": "main", "ext": "png"},
    ]
    assert parse_card(json.dumps(v3).encode()).avatar == url
    assert parse_card(json.dumps(v3_card()).encode()).avatar is None  # ccdefault: is not an image


def test_persona_joins_only_present_fields() -> None:
    def persona(description: str, personality: str, scenario: str) -> str:
        card = {"name": "X", "description": description, "personality": personality, "scenario": scenario}
        return parse_card(json.dumps(card).encode()).persona

    assert persona("Desc.", "", "") == "Desc."
    assert persona("  Desc. \n", "", "  ") == "  Desc. \n"
    assert persona("Desc.\n", " kind ", "") == "Desc.\n\nPersonality: kind"
    assert persona("", "kind", "park") == "Personality: kind\n\nScenario: park"
    assert persona("", "", "") == ""


# --- export and round trips --------------------------------------------------------------------------


def test_export_of_unmodified_v2_reproduces_its_data_and_mirrors_v1_fields() -> None:
    card = v2_card()
    ch = parse_card(png_with(text("chara", card)))
    out = card_json_v2(ch)
    assert out["data"] == card["data"]
    assert out == card  # the sample already has ST's top-level mirror and extra keys
    assert ch.extra == card  # export does not mutate the character


def test_png_round_trip_keeps_character_and_unknown_fields() -> None:
    for card in (v2_card(), v3_card()):
        first = parse_card(png_with(text("ccv3" if card["spec"] == "chara_card_v3" else "chara", card)))
        png = card_png_v2(first)
        chunks = read_chunks(png)
        assert [t for t, _ in chunks] == [b"IHDR", b"IDAT", b"tEXt", b"IEND"]
        assert chunks[2][1].startswith(b"chara\0")
        second = parse_card(png)
        same_character(first, second)
        assert second.extra["spec"] == "chara_card_v2"
        assert second.extra["spec_version"] == "2.0"
        assert second.extra["data"] == card["data"]
        assert card_png_v2(second) == png  # stable from the first export on


def test_v3_export_is_v2_with_v3_fields_kept() -> None:
    ch = parse_card(json.dumps(v3_card()).encode())
    out = card_json_v2(ch)
    assert (out["spec"], out["spec_version"]) == ("chara_card_v2", "2.0")
    assert out["data"] == v3_card()["data"]
    assert {
        k: out[k] for k in ("name", "description", "personality", "scenario", "first_mes", "mes_example")
    } == {
        "name": "Bram",
        "description": "A blacksmith.",
        "personality": "",
        "scenario": "A village forge at dawn.",
        "first_mes": "The hammer rings.",
        "mes_example": "",
    }


def test_json_round_trip_of_v1_card() -> None:
    first = parse_card(json.dumps(v1_card()).encode())
    out = card_json_v2(first)
    assert out["metadata"] == {"version": 1}
    second = parse_card(json.dumps(out).encode())
    same_character(first, second)
    assert second.extra == out


def test_editing_fields_overwrites_them_and_keeps_the_rest() -> None:
    ch = parse_card(png_with(text("chara", v2_card())))
    ch.name, ch.greeting, ch.example_message = "Aria II", "Ahoy.", ""
    ch.persona = "{{char}} is the captain now.\n\nPersonality: calm, dry humour"  # description edited only
    out = card_json_v2(ch)
    assert out["data"]["description"] == "{{char}} is the captain now."
    assert out["data"]["personality"] == "calm, dry humour"
    assert (out["data"]["name"], out["data"]["first_mes"], out["data"]["mes_example"]) == (
        "Aria II",
        "Ahoy.",
        "",
    )
    assert (out["name"], out["description"], out["first_mes"]) == (
        "Aria II",
        "{{char}} is the captain now.",
        "Ahoy.",
    )
    assert out["data"]["character_book"] == v2_card()["data"]["character_book"]
    assert out["data"]["x_unknown"] == {"nested": [1, 2, 3]}
    assert out["creatorcomment"] == "top-level ST field"
    same_character(parse_card(card_png_v2(ch)), ch)


def test_rewritten_persona_goes_whole_into_description() -> None:
    ch = parse_card(json.dumps(v1_card()).encode())
    ch.persona = "Personality: gruff\n\nA rewritten persona."
    out = card_json_v2(ch)
    assert (out["data"]["description"], out["data"]["personality"], out["data"]["scenario"]) == (
        "Personality: gruff\n\nA rewritten persona.",
        "",
        "",
    )
    assert parse_card(json.dumps(out).encode()).persona == ch.persona


def test_user_alias_travels_in_our_extension_and_can_be_cleared() -> None:
    ch = parse_card(png_with(text("chara", v2_card())))
    ch.user_alias = "Captain"
    out = card_json_v2(ch)
    assert out["data"]["extensions"]["rwkv_gateway"] == {"user": "Captain"}
    assert out["data"]["extensions"]["depth_prompt"] == {"depth": 4}
    again = parse_card(card_png_v2(ch))
    assert again.user_alias == "Captain"
    again.user_alias = ""
    assert card_json_v2(again)["data"]["extensions"] == v2_card()["data"]["extensions"]


def test_character_made_here_exports_a_complete_v2_card_and_placeholder_png() -> None:
    ch = CardCharacter(name="Eve", persona="A gardener.", greeting="Hello, {{user}}.", example_message="e")
    out = card_json_v2(ch)
    assert out == {
        "name": "Eve",
        "description": "A gardener.",
        "personality": "",
        "scenario": "",
        "first_mes": "Hello, {{user}}.",
        "mes_example": "e",
        "spec": "chara_card_v2",
        "spec_version": "2.0",
        "data": {
            "name": "Eve",
            "description": "A gardener.",
            "personality": "",
            "scenario": "",
            "first_mes": "Hello, {{user}}.",
            "mes_example": "e",
            "creator_notes": "",
            "system_prompt": "",
            "post_history_instructions": "",
            "alternate_greetings": [],
            "tags": [],
            "creator": "",
            "character_version": "",
            "extensions": {},
        },
    }
    png = card_png_v2(ch)
    chunks = read_chunks(png)
    assert [t for t, _ in chunks] == [b"IHDR", b"IDAT", b"tEXt", b"IEND"]
    assert struct.unpack(">II", chunks[0][1][:8]) == (1, 1)
    assert zlib.decompress(chunks[1][1]) == b"\x00\x00\x00\x00\x00"
    assert json.loads(base64.b64decode(chunks[2][1].removeprefix(b"chara\0"))) == out
    back = parse_card(png)
    assert (back.name, back.persona, back.greeting, back.example_message) == (
        "Eve",
        "A gardener.",
        "Hello, {{user}}.",
        "e",
    )


def test_png_export_uses_the_avatar_and_strips_its_old_card_chunks() -> None:
    avatar_png = png_with(text("ccv3", v3_card()), chunk(b"tEXt", b"chara\0stale"))
    ch = CardCharacter(name="Fay", persona="p", greeting="g", avatar=data_url(avatar_png))
    chunks = read_chunks(card_png_v2(ch))
    assert [t for t, _ in chunks] == [b"IHDR", b"IDAT", b"tEXt", b"IEND"]
    assert chunks[1][1] == read_chunks(plain_png())[1][1]
    assert parse_card(card_png_v2(ch)).avatar == data_url(plain_png())


def test_png_export_falls_back_to_placeholder_for_non_png_or_broken_avatars() -> None:
    placeholder = card_png_v2(CardCharacter(name="G", persona="", greeting=""))
    for avatar in ("data:image/jpeg;base64,/9j/4AAQ", "data:image/png;base64,!!!", "https://x/y.png"):
        assert card_png_v2(CardCharacter(name="G", persona="", greeting="", avatar=avatar)) == placeholder


def test_png_export_does_not_embed_a_data_url_avatar_twice() -> None:
    card = v2_card()
    card["data"]["avatar"] = data_url(plain_png())
    ch = parse_card(json.dumps(card).encode())
    assert card_json_v2(ch)["data"]["avatar"] == data_url(plain_png())
    inner = json.loads(base64.b64decode(read_chunks(card_png_v2(ch))[2][1].removeprefix(b"chara\0")))
    assert "avatar" not in inner["data"]
    ch.avatar = None
    assert "avatar" not in card_json_v2(ch)["data"]


# --- errors and hostile input ------------------------------------------------------------------------


def test_not_png_nor_json() -> None:
    assert bad(b"\xff\xd8\xff\xe0JFIF") == "card is neither a PNG image nor JSON"
    assert bad(b"") == "card is neither a PNG image nor JSON"
    assert bad(b"name: Aria") == "card is neither a PNG image nor JSON"


def test_png_without_a_card_chunk() -> None:
    message = "card PNG has no 'chara' or 'ccv3' text chunk (not a character card)"
    assert bad(plain_png()) == message
    assert bad(png_with(chunk(b"tEXt", b"Comment\0chara"))) == message


def test_bad_payloads_in_the_card_chunk() -> None:
    assert bad(png_with(chunk(b"tEXt", b"chara\0@@@@"))) == "card PNG text chunk is not valid base64"
    not_json = base64.b64encode(b"{not json")
    assert bad(png_with(chunk(b"tEXt", b"chara\0" + not_json))).startswith(
        "card PNG text chunk is not valid JSON ("
    )
    latin = base64.b64encode(b"\xff\xfe{}")
    assert bad(png_with(chunk(b"tEXt", b"chara\0" + latin))) == "card PNG text chunk is not valid UTF-8"
    assert bad(png_with(text("chara", {"description": "no name"}))) == (
        "card JSON has no character name (not a character card)"
    )
    corrupt = chunk(b"zTXt", b"chara\0\0" + b"\x78\x9c garbage")
    assert bad(png_with(corrupt)).startswith("card PNG text chunk is not valid zlib data (")
    truncated = chunk(b"zTXt", b"chara\0\0" + zlib.compress(b64json(v1_card()))[:-6])
    assert bad(png_with(truncated)) == "card PNG text chunk holds truncated zlib data"
    assert (
        bad(png_with(chunk(b"zTXt", b"chara\0\x05xx")))
        == "card PNG zTXt chunk uses an unknown compression method"
    )
    assert bad(png_with(chunk(b"iTXt", b"chara\0\x00\x00en"))) == "card PNG iTXt chunk is malformed"


def test_bad_json_cards() -> None:
    assert bad(b"{nope").startswith("card JSON is not valid JSON (Expecting property name")
    assert bad(b'{"name": "\xff"}') == "card JSON is not valid UTF-8"
    assert bad(b"[1, 2]") == "card JSON must be an object"
    assert bad(b'{"spec": "chara_card_v2", "data": {"name": "  "}}') == (
        "card JSON has no character name (not a character card)"
    )
    assert bad(b'{"name": 5}') == "card JSON has no character name (not a character card)"
    assert bad(b'{"name": "A", "first_mes": ["x"]}') == "card field 'first_mes' must be a string"
    assert bad(b"[" * 100_000 + b"]" * 100_000) == "card JSON is not valid JSON"


def test_too_large() -> None:
    assert bad(b"{" + b" " * 100, max_bytes=64) == "card is too large (101 bytes; the limit is 64)"
    assert bad(plain_png(), max_bytes=10) == f"card is too large ({len(plain_png())} bytes; the limit is 10)"


def test_crc_error() -> None:
    png = bytearray(png_with(text("chara", v2_card())))
    png[45] ^= 0x01  # inside the tEXt body (the chunk starts at 33: signature 8 + IHDR 25)
    assert bad(bytes(png)) == "card PNG chunk tEXt at byte 33 fails its CRC check"


def test_structural_damage_is_rejected() -> None:
    good = png_with(text("chara", v2_card()))
    assert bad(good[:-12]) == "card PNG is truncated (no IEND chunk)"
    assert bad(SIG) == "card PNG is truncated (no IEND chunk)"
    assert (
        bad(SIG + chunk(b"IDAT", b"") + chunk(b"IEND", b"")) == "card PNG does not start with an IHDR chunk"
    )
    assert (
        bad(SIG + b"\x00\x00\x00\x00\x00\x01\x02\x03" + b"\x00" * 4)
        == "card PNG has a malformed chunk at byte 8"
    )


def test_huge_chunk_length_header_is_rejected_before_reading() -> None:
    hostile = SIG + struct.pack(">I", 0xFFFFFFF0) + b"IHDR" + b"\x00" * 32
    assert bad(hostile) == "card PNG chunk IHDR claims 4294967280 bytes, more than the file holds"
    in_range = SIG + image_chunks()[0] + struct.pack(">I", 2**30) + b"tEXt" + b"chara\0"
    assert bad(in_range) == "card PNG chunk tEXt claims 1073741824 bytes, more than the file holds"


def test_decompression_bomb_is_capped() -> None:
    bomb = zlib.compress(b"A" * 4_000_000, 9)  # ~4 KB that inflates to 4 MB
    assert len(bomb) < 10_000
    message = "card PNG text chunk inflates to more than 100000 bytes"
    assert bad(png_with(chunk(b"zTXt", b"chara\0\0" + bomb)), max_bytes=100_000) == message
    itxt_bomb = chunk(b"iTXt", b"ccv3\0\x01\x00\0\0" + bomb)
    assert bad(png_with(itxt_bomb), max_bytes=100_000) == message


def test_non_card_text_chunks_are_never_inflated() -> None:
    garbage = chunk(b"zTXt", b"Comment\0\0not zlib at all")
    assert parse_card(png_with(garbage, text("chara", v2_card()))).name == "Aria"
