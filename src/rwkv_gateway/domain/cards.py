"""SillyTavern character cards (V1, V2, V3; PNG or JSON) <-> the role-play character, stdlib only.

This module owns the card codec used by `/characters/import` and `/characters/export`: finding the
card in a PNG (`tEXt`, `iTXt` or `zTXt` chunk with keyword `ccv3`, preferred, or `chara`, holding
base64 of UTF-8 JSON), reading V1 (flat), V2 (`chara_card_v2`, fields under `data`) and V3
(`chara_card_v3`) JSON, mapping a card onto a `CardCharacter`, and writing V2 cards back as JSON or PNG.

Mapping. `name` -> name; `first_mes` -> greeting; `mes_example` -> example_message. The persona is
the `description`, then a `"Personality: ..."` paragraph if the card has a personality, then a
`"Scenario: ..."` paragraph if it has a scenario (paragraphs separated by a blank line). `{{char}}` and
`{{user}}` placeholders stay as they are. Export writes the persona back into the original split when
that still reproduces it exactly (unchanged persona, or an edit of the description part only);
otherwise the whole persona becomes the `description` and `personality`/`scenario` are emptied, so
that parse -> export -> parse always gives the same character. `user_alias` has no SillyTavern field;
it travels in `data.extensions.rwkv_gateway.user`. Every other field of the original card (tags,
creator, character_book, alternate_greetings, extensions, V3-only fields, unknown keys) is kept in
`CardCharacter.extra` and written back untouched.

Hostile input is bounded: the whole input, each chunk (checked against the bytes actually present
before anything is read) and every zlib stream (decompressed with a hard output cap) are limited to
`max_bytes`; CRCs are verified; only the card chunks are ever decompressed.
"""

from __future__ import annotations

import base64
import binascii
import copy
import json
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

from rwkv_gateway.errors import InvalidParameter

__all__ = ["CardCharacter", "card_json_v2", "card_png_v2", "parse_card"]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CARD_KEYWORDS = ("ccv3", "chara")  # in order of preference, as SillyTavern reads them
_TEXT_CHUNKS = (b"tEXt", b"zTXt", b"iTXt")
_MAX_CHUNK_LENGTH = 2**31 - 1  # PNG spec limit for a chunk length
_PARAM = "card"
#: The extensions namespace this gateway writes its own fields into (SillyTavern convention).
EXTENSION_KEY = "rwkv_gateway"
_V2_DEFAULTS: dict[str, Any] = {
    "name": "",
    "description": "",
    "personality": "",
    "scenario": "",
    "first_mes": "",
    "mes_example": "",
    "creator_notes": "",
    "system_prompt": "",
    "post_history_instructions": "",
    "alternate_greetings": [],
    "tags": [],
    "creator": "",
    "character_version": "",
    "extensions": {},
}
_MIRRORED = ("name", "description", "personality", "scenario", "first_mes", "mes_example")
#: Pre-V1 (TavernAI / Pygmalion) flat field names and their V1 equivalents.
_LEGACY_FLAT = {
    "char_name": "name",
    "char_persona": "description",
    "world_scenario": "scenario",
    "char_greeting": "first_mes",
    "example_dialogue": "mes_example",
}


@dataclass(slots=True)
class CardCharacter:
    name: str
    persona: str
    greeting: str
    example_message: str = ""
    #: What the character calls the user; "" when the card has none.
    user_alias: str = ""
    #: A data URL ("data:image/png;base64,...") or None.
    avatar: str | None = None
    #: The whole original card JSON (V1 cards wrapped as V2), for round trips.
    extra: dict[str, Any] = field(default_factory=dict)


def _bad(message: str) -> InvalidParameter:
    return InvalidParameter(message, param=_PARAM)


# --- persona <-> description / personality / scenario ---------------------------------------------


def compose_persona(description: str, personality: str, scenario: str) -> str:
    """The persona text for a card's three descriptive fields (see the module docstring)."""
    labelled = (("Personality", personality), ("Scenario", scenario))
    tail = [f"{label}: {text.strip()}" for label, text in labelled if text.strip()]
    if not tail:
        return description
    head = [description.rstrip()] if description.strip() else []
    return "\n\n".join(head + tail)


def _split_persona(persona: str, personality: str, scenario: str) -> tuple[str, str, str]:
    """Fields that compose back to `persona`, keeping `personality`/`scenario` when possible."""
    tail = compose_persona("", personality, scenario)
    if tail:
        if persona == tail:
            return "", personality, scenario
        if persona.endswith("\n\n" + tail):
            description = persona[: -len(tail) - 2]
            if compose_persona(description, personality, scenario) == persona:
                return description, personality, scenario
    return persona, "", ""


# --- PNG --------------------------------------------------------------------------------------------


def _chunk(ctype: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", zlib.crc32(ctype + body))


def _walk_png(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, body) of every chunk up to and including IEND, CRCs verified; trailing bytes ignored."""
    chunks: list[tuple[bytes, bytes]] = []
    pos, end = len(PNG_SIGNATURE), len(data)
    while True:
        if pos + 12 > end:
            raise _bad("card PNG is truncated (no IEND chunk)")
        length, ctype = struct.unpack_from(">I4s", data, pos)
        if not ctype.isalpha():
            raise _bad(f"card PNG has a malformed chunk at byte {pos}")
        if length > _MAX_CHUNK_LENGTH or pos + 12 + length > end:
            raise _bad(
                f"card PNG chunk {ctype.decode('ascii')} claims {length} bytes, more than the file holds"
            )
        body = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack_from(">I", data, pos + 8 + length)
        if zlib.crc32(ctype + body) != crc:
            raise _bad(f"card PNG chunk {ctype.decode('ascii')} at byte {pos} fails its CRC check")
        if not chunks and ctype != b"IHDR":
            raise _bad("card PNG does not start with an IHDR chunk")
        chunks.append((ctype, body))
        pos += 12 + length
        if ctype == b"IEND":
            return chunks


def _inflate(compressed: bytes, limit: int) -> bytes:
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(compressed, limit)
    except zlib.error as exc:
        raise _bad(f"card PNG text chunk is not valid zlib data ({exc})") from None
    if inflater.unconsumed_tail:
        raise _bad(f"card PNG text chunk inflates to more than {limit} bytes")
    if not inflater.eof:
        raise _bad("card PNG text chunk holds truncated zlib data")
    return out


def _text_keyword(body: bytes) -> str:
    keyword, sep, _ = body.partition(b"\0")
    return keyword.decode("latin-1").lower() if sep else ""


def _text_value(ctype: bytes, body: bytes, limit: int) -> str:
    """The text of a tEXt / zTXt / iTXt chunk (PNG spec 11.3.4)."""
    _, _, rest = body.partition(b"\0")
    if ctype == b"tEXt":
        return rest.decode("latin-1")
    if ctype == b"zTXt":
        if not rest or rest[0] != 0:
            raise _bad("card PNG zTXt chunk uses an unknown compression method")
        return _inflate(rest[1:], limit).decode("latin-1")
    # iTXt: compression flag, method, language tag \0, translated keyword \0, UTF-8 text
    if len(rest) < 2:
        raise _bad("card PNG iTXt chunk is malformed")
    flag, method = rest[0], rest[1]
    parts = rest[2:].split(b"\0", 2)
    if len(parts) != 3 or flag not in (0, 1) or (flag == 1 and method != 0):
        raise _bad("card PNG iTXt chunk is malformed")
    text = _inflate(parts[2], limit) if flag else parts[2]
    try:
        return text.decode("utf-8")
    except UnicodeDecodeError:
        raise _bad("card PNG iTXt chunk is not valid UTF-8") from None


def _decode_base64_json(text: str) -> Any:
    compact = "".join(text.split())
    compact += "=" * (-len(compact) % 4)  # some writers drop the padding
    try:
        raw = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise _bad("card PNG text chunk is not valid base64") from None
    return _loads(raw, "card PNG text chunk")


def _strip_text_chunks(chunks: list[tuple[bytes, bytes]]) -> bytes:
    return PNG_SIGNATURE + b"".join(
        _chunk(ctype, body) for ctype, body in chunks if ctype not in _TEXT_CHUNKS
    )


def _png_data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _card_from_png(data: bytes, max_bytes: int) -> tuple[Any, str]:
    chunks = _walk_png(data)
    text_chunks = [(t, b, _text_keyword(b)) for t, b in chunks if t in _TEXT_CHUNKS]
    # the first chunk of each keyword, as SillyTavern reads them: ccv3 first, then chara
    firsts = (next(((t, b) for t, b, k in text_chunks if k == kw), None) for kw in _CARD_KEYWORDS)
    candidates = [hit for hit in firsts if hit is not None]
    if not candidates:
        raise _bad("card PNG has no 'chara' or 'ccv3' text chunk (not a character card)")
    first_error: InvalidParameter | None = None
    for ctype, body in candidates:  # a broken ccv3 falls back to the chara chunk when there is one
        try:
            card = _decode_base64_json(_text_value(ctype, body, max_bytes))
            _card_fields(card)
        except InvalidParameter as exc:
            first_error = first_error or exc
            continue
        return card, _png_data_url(_strip_text_chunks(chunks))
    assert first_error is not None
    raise first_error


# --- JSON -------------------------------------------------------------------------------------------


def _loads(raw: bytes, what: str) -> Any:
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise _bad(f"{what} is not valid UTF-8") from None
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        detail = f" ({exc})" if isinstance(exc, json.JSONDecodeError) else ""
        raise _bad(f"{what} is not valid JSON{detail}") from None


def _card_fields(card: Any) -> dict[str, Any]:
    """The dict holding the card's fields (V2/V3 `data`, or the V1 card itself); checks it has a name."""
    if not isinstance(card, dict):
        raise _bad("card JSON must be an object")
    fields = card["data"] if isinstance(card.get("data"), dict) else _v1_fields(card)
    name = fields.get("name")
    if not isinstance(name, str) or not name.strip():
        raise _bad("card JSON has no character name (not a character card)")
    for key in ("description", "personality", "scenario", "first_mes", "mes_example"):
        if fields.get(key) is not None and not isinstance(fields[key], str):
            raise _bad(f"card field '{key}' must be a string")
    return fields


def _v1_fields(card: dict[str, Any]) -> dict[str, Any]:
    fields = dict(card)
    for old, new in _LEGACY_FLAT.items():
        if old in fields and new not in fields:
            fields[new] = fields.pop(old)
    return fields


def _as_v2(card: dict[str, Any]) -> dict[str, Any]:
    """V2 and V3 cards as they are; a V1 card wrapped as V2 (its keys also kept at the top level)."""
    if isinstance(card.get("data"), dict):
        return card
    fields = _v1_fields(card)
    data = {key: fields.get(key, copy.deepcopy(default)) for key, default in _V2_DEFAULTS.items()}
    for key in ("description", "personality", "scenario", "first_mes", "mes_example"):
        data[key] = data[key] or ""
    # keys mapped into `data` under their V1 names are not kept under their pre-V1 names
    top = {k: v for k, v in card.items() if k not in ("spec", "spec_version", "data", *_LEGACY_FLAT)}
    return {**top, "spec": "chara_card_v2", "spec_version": "2.0", "data": data}


def _is_image_data_url(value: Any) -> bool:
    return isinstance(value, str) and value[:11].lower() == "data:image/"


def _json_avatar(card: dict[str, Any], fields: dict[str, Any]) -> str | None:
    if _is_image_data_url(fields.get("avatar")):
        return str(fields["avatar"])
    assets = fields.get("assets")
    if isinstance(assets, list):  # V3: the main icon, when it is embedded as a data URI
        for asset in assets:
            if (
                isinstance(asset, dict)
                and asset.get("type") == "icon"
                and asset.get("name") == "main"
                and _is_image_data_url(asset.get("uri"))
            ):
                return str(asset["uri"])
    if _is_image_data_url(card.get("avatar")):
        return str(card["avatar"])
    return None


def _user_alias(fields: dict[str, Any]) -> str:
    ext = fields.get("extensions")
    ours = ext.get(EXTENSION_KEY) if isinstance(ext, dict) else None
    user = ours.get("user") if isinstance(ours, dict) else None
    return user if isinstance(user, str) else ""


def _text(fields: dict[str, Any], key: str) -> str:
    value = fields.get(key)
    return value if isinstance(value, str) else ""


# --- public API -------------------------------------------------------------------------------------


def parse_card(data: bytes, *, max_bytes: int = 8 * 2**20) -> CardCharacter:
    """Read a character card: a PNG with a card text chunk, or the card JSON (V1, V2 or V3).

    Raises InvalidParameter(param="card") with a message saying what is wrong.
    """
    if len(data) > max_bytes:
        raise _bad(f"card is too large ({len(data)} bytes; the limit is {max_bytes})")
    avatar: str | None = None
    if data.startswith(PNG_SIGNATURE):
        card, avatar = _card_from_png(data, max_bytes)
    else:
        if data.removeprefix(b"\xef\xbb\xbf").lstrip()[:1] not in (b"{", b"["):
            raise _bad("card is neither a PNG image nor JSON")
        card = _loads(data, "card JSON")
    fields = _card_fields(card)
    if avatar is None:
        avatar = _json_avatar(card, fields)
    return CardCharacter(
        name=fields["name"],
        persona=compose_persona(*(_text(fields, k) for k in ("description", "personality", "scenario"))),
        greeting=_text(fields, "first_mes"),
        example_message=_text(fields, "mes_example"),
        user_alias=_user_alias(fields),
        avatar=avatar,
        extra=_as_v2(card),
    )


def card_json_v2(ch: CardCharacter) -> dict[str, Any]:
    """A V2 card for `ch`: the original card's fields kept, the character's own fields written over them."""
    original = copy.deepcopy(ch.extra)
    source = original.get("data")
    data: dict[str, Any] = source if isinstance(source, dict) else {}
    for key, default in _V2_DEFAULTS.items():
        if not isinstance(data.get(key), type(default)):
            data[key] = copy.deepcopy(default)
    if compose_persona(data["description"], data["personality"], data["scenario"]) == ch.persona:
        description, personality, scenario = data["description"], data["personality"], data["scenario"]
    else:
        description, personality, scenario = _split_persona(ch.persona, data["personality"], data["scenario"])
    data.update(
        name=ch.name,
        description=description,
        personality=personality,
        scenario=scenario,
        first_mes=ch.greeting,
        mes_example=ch.example_message,
    )
    ext: dict[str, Any] = data["extensions"]
    ours = ext.get(EXTENSION_KEY)
    if ch.user_alias:
        ours = ours if isinstance(ours, dict) else {}
        ext[EXTENSION_KEY] = {**ours, "user": ch.user_alias}
    elif isinstance(ours, dict) and "user" in ours:
        del ours["user"]
        if not ours:
            del ext[EXTENSION_KEY]
    if _is_image_data_url(data.get("avatar")):  # the avatar came from here: keep it current
        if ch.avatar is None:
            del data["avatar"]
        else:
            data["avatar"] = ch.avatar
    top = {k: v for k, v in original.items() if k not in ("spec", "spec_version", "data")}
    top.update({key: data[key] for key in _MIRRORED})  # SillyTavern's V1 mirror of the main fields
    return {**top, "spec": "chara_card_v2", "spec_version": "2.0", "data": data}


def _placeholder_png() -> bytes:
    """A 1x1 transparent RGBA PNG."""
    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 6, 0, 0, 0)
    pixels = zlib.compress(b"\x00" + b"\x00" * 4)
    return PNG_SIGNATURE + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", pixels) + _chunk(b"IEND", b"")


def _avatar_chunks(avatar: str | None) -> list[tuple[bytes, bytes]]:
    """The avatar's chunks without text chunks; the placeholder's when it is not a readable PNG."""
    if _is_image_data_url(avatar):
        assert avatar is not None
        meta, sep, payload = avatar.partition(",")
        if sep and meta.lower().endswith(";base64"):
            try:
                png = base64.b64decode(payload, validate=True)
                if png.startswith(PNG_SIGNATURE):
                    return [(t, b) for t, b in _walk_png(png) if t not in _TEXT_CHUNKS]
            except (binascii.Error, ValueError, InvalidParameter):
                pass
    return _walk_png(_placeholder_png())


def card_png_v2(ch: CardCharacter) -> bytes:
    """A V2 card PNG: the avatar image (or a 1x1 placeholder) with a `chara` tEXt chunk before IEND."""
    card = card_json_v2(ch)
    if _is_image_data_url(card["data"].get("avatar")):
        del card["data"]["avatar"]  # the image is the PNG itself; don't embed it twice
    payload = base64.b64encode(json.dumps(card, ensure_ascii=False).encode("utf-8"))
    chunks = _avatar_chunks(ch.avatar)
    body = b"".join(_chunk(t, b) for t, b in chunks[:-1])
    return PNG_SIGNATURE + body + _chunk(b"tEXt", b"chara\0" + payload) + _chunk(b"IEND", b"")
