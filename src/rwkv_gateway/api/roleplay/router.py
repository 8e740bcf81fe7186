"""The role-play routes (RWKV_Role_Playing_API and its Vue UI): POST at the root path, envelope replies.

Thin handlers: read the merged parameters (`params.py`), run the token check first (every route but
`/login` and `/login/tmp`), call the services, answer with the `{"data", "message", "code"}` envelope
(always HTTP 200) or, for `/chat/reply` and `/chat/resay`, the original's cumulative stream. `install`
mounts the optional static UI; `cors_scope` is this dialect's CORS policy.
"""

# ruff: noqa: RUF001  (the reference's messages use full-width punctuation)

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.staticfiles import StaticFiles

from rwkv_gateway.api.common.cors import CORSPolicy
from rwkv_gateway.api.common.deps import RoleplayDep, SettingsDep, UsersDep
from rwkv_gateway.api.common.disconnect import unless_disconnected
from rwkv_gateway.api.common.errors import ErrorRenderer, dialect_route
from rwkv_gateway.api.roleplay.errors import RoleplayErrors, envelope
from rwkv_gateway.api.roleplay.params import Params, read_params
from rwkv_gateway.api.roleplay.streaming import ReplyStream
from rwkv_gateway.domain.roleplay_store import CardFields
from rwkv_gateway.errors import GatewayError
from rwkv_gateway.services.roleplay import RoleplayService
from rwkv_gateway.services.roleplay_prompts import sampling_params
from rwkv_gateway.services.roleplay_types import (
    MSG_EMPTY,
    Account,
    ReplyJob,
    RoleplayFailure,
)
from rwkv_gateway.services.users import UserService
from rwkv_gateway.settings import Settings

router = APIRouter(route_class=dialect_route(RoleplayErrors()), tags=["roleplay"])

PATHS = (
    "/login",
    "/login/tmp",
    "/characters/list",
    "/characters/get",
    "/characters/save",
    "/characters/del",
    "/characters/load",
    "/characters/import",
    "/characters/export",
    "/chat/reply",
    "/chat/resay",
    "/chat/reset",
    "/chat/back",
    "/chat/tamper",
    "/debug/token",
)


async def get_params(request: Request, settings: SettingsDep) -> AsyncIterator[Params]:
    params = await read_params(request, max_part_bytes=settings.max_body_bytes)
    try:
        yield params
    finally:
        await params.aclose()


ParamsDep = Annotated[Params, Depends(get_params)]


async def _account(users: UserService, params: Params) -> Account:
    return await users.authenticate(params.text("user_name"), params.text("token"))


def _sampling(params: Params) -> Any:
    return sampling_params(
        tau=params.number("tau"),
        rate=params.number("rate"),
        min_p=params.number("min_p"),
        temperature=params.number("temperature"),
        presence_penalty=params.number("presence_penalty"),
    )


async def reply_texts(service: RoleplayService, job: ReplyJob) -> AsyncGenerator[str, None]:
    """A reply as the client gets it: the whole text so far after every piece; then, once the service
    has saved the turn, the final text. A reply that fails, or whose client goes away before its end
    (this generator is closed early), saves nothing. The chat's guard is released at the end."""
    try:
        async for text in job.texts():
            yield text
        if job.reply is not None:
            await service.save_reply(job)
            yield job.reply.final
    finally:
        job.close()


async def _respond_reply(
    request: Request, service: RoleplayService, job: ReplyJob, params: Params
) -> Response:
    texts = reply_texts(service, job)
    if params.streaming():
        return ReplyStream(texts, job.close)
    try:
        reply = await unless_disconnected(request, _last(texts))
    finally:
        job.close()
    return envelope({"reply": reply})


async def _last(texts: AsyncIterator[str]) -> str:
    # The non-streamed answer: the last text (the final reply; the text so far after a failure).
    last = ""
    async for text in texts:
        last = text
    return last


@router.post("/login")
async def login(users: UsersDep, params: ParamsDep) -> Response:
    """Password login: a new token (the previous one stops working)."""
    name, token = await users.login(params.text("user_name"), params.text("password"))
    return envelope({"user_name": name, "token": token})


@router.post("/login/tmp")
async def login_guest(users: UsersDep, params: ParamsDep) -> Response:  # noqa: ARG001
    """A guest account (`tmp-<hex>`, token = name), removed after the configured idle time."""
    name, token = await users.login_guest()
    return envelope({"user_name": name, "token": token})


@router.post("/characters/list")
async def list_characters(users: UsersDep, service: RoleplayDep, params: ParamsDep) -> Response:
    """The user's characters, by file name: `{"list": [{"char_name", "file_name", "avatar"}]}`."""
    account = await _account(users, params)
    return envelope({"list": await service.characters.list(account)})


@router.post("/characters/get")
async def get_character(users: UsersDep, service: RoleplayDep, params: ParamsDep) -> Response:
    """One character card as stored."""
    account = await _account(users, params)
    return envelope(await service.characters.get(account, params.text("character_name")))


@router.post("/characters/save")
async def save_character(users: UsersDep, service: RoleplayDep, params: ParamsDep) -> Response:
    """Create or overwrite the card `bot`; its chat starts over."""
    account = await _account(users, params)
    card = CardFields(
        user=params.text("user") or "",
        bot=params.text("bot") or "",
        greeting=params.text("greeting") or "",
        bot_persona=params.text("bot_persona") or "",
        example_message=params.text("example_message") or "",
        use_qa=params.flag("use_qa"),
        avatar=params.text("avatar"),
    )
    await service.characters.save(account, card)
    return envelope(None)


@router.post("/characters/del")
async def delete_character(users: UsersDep, service: RoleplayDep, params: ParamsDep) -> Response:
    """Delete a card and its chat (succeeds for unknown names too)."""
    account = await _account(users, params)
    await service.characters.delete(account, params.text("character_name"))
    return envelope(None)


@router.post("/characters/load")
async def load(users: UsersDep, service: RoleplayDep, params: ParamsDep) -> Response:
    """Open the chat (created with the greeting if none): `{"chat": [[user|null, bot|null], ...]}`."""
    account = await _account(users, params)
    return envelope({"chat": await service.load(account, params.text("character_name"))})


@router.post("/chat/reply", response_model=None)
async def reply(request: Request, users: UsersDep, service: RoleplayDep, params: ParamsDep) -> Response:
    """Send `prompt`; the reply streams (or, with `stream=0`, comes as `{"reply": ...}`)."""
    # Only this route trims its text fields, user_name included (as the reference does).
    user_name = params.text("user_name")
    account = await users.authenticate(None if user_name is None else user_name.strip(), params.text("token"))
    job = await service.reply(
        account, params.text("character_name"), params.text("prompt"), _sampling(params)
    )
    return await _respond_reply(request, service, job, params)


@router.post("/chat/resay", response_model=None)
async def resay(request: Request, users: UsersDep, service: RoleplayDep, params: ParamsDep) -> Response:
    """Regenerate the last reply from the state before it."""
    account = await _account(users, params)
    job = await service.resay(account, params.text("character_name"), _sampling(params))
    return await _respond_reply(request, service, job, params)


@router.post("/chat/reset")
async def reset(users: UsersDep, service: RoleplayDep, params: ParamsDep) -> Response:
    """Start the chat over (greeting only)."""
    account = await _account(users, params)
    return envelope({"chat": await service.reset(account, params.text("character_name"))})


@router.post("/chat/back")
async def back(users: UsersDep, service: RoleplayDep, params: ParamsDep) -> Response:
    """Rewind to row `log_index` (0 = the greeting)."""
    account = await _account(users, params)
    await service.back(account, params.text("character_name"), params.integer("log_index"))
    return envelope(None)


@router.post("/chat/tamper")
async def tamper(users: UsersDep, service: RoleplayDep, params: ParamsDep) -> Response:
    """Replace the last reply with `message`."""
    account = await _account(users, params)
    await service.tamper(account, params.text("character_name"), params.text("message"))
    return envelope(None)


@router.post("/debug/token")
async def debug_token(users: UsersDep, service: RoleplayDep, params: ParamsDep) -> Response:
    """What the model has consumed in this chat: `{"token_count", "token_state"}`."""
    account = await _account(users, params)
    return envelope(await service.debug(account, params.text("character_name")))


# ---------------------------------------------------------------------------- character cards


async def _card_bytes(params: Params) -> bytes | None:
    upload = params.upload("file")
    if upload is not None:
        return await upload.read()
    for key in ("card", "data"):
        text = params.text(key)
        if text:
            return text.encode("utf-8")
    return None


@router.post("/characters/import")
async def import_card(request: Request, users: UsersDep, service: RoleplayDep, params: ParamsDep) -> Response:
    """Import a SillyTavern character card: a multipart `file` (PNG with a `chara`/`ccv3` chunk, or
    card JSON), a `card` field holding the JSON, or the card JSON itself as the body (V2 or V3)."""
    from rwkv_gateway.domain import cards  # the codec may not be present in every build

    account = await _account(users, params)
    data = await _card_bytes(params)
    if data is None and request.headers.get("content-type", "").startswith("application/json"):
        data = _strip_auth_fields(await request.body())  # read (and cached) by the parameter parser
    if not data:
        raise RoleplayFailure(MSG_EMPTY)
    card = cards.parse_card(data)
    fields = CardFields(
        user=card.user_alias or "User",
        bot=card.name,
        greeting=card.greeting,
        bot_persona=card.persona,
        example_message=card.example_message,
        use_qa=False,
        avatar=card.avatar,
    )
    await service.characters.save(account, fields, extra=dict(card.extra), require_greeting=False)
    return envelope({"char_name": fields.bot, "file_name": f"{fields.bot}.json"})


def _strip_auth_fields(raw: bytes) -> bytes:
    # A JSON body may carry user_name/token next to the card's own fields; the card codec sees only
    # the card.
    try:
        obj = json.loads(raw)
    except ValueError:
        return raw
    if isinstance(obj, dict):
        obj = {k: v for k, v in obj.items() if k not in ("user_name", "token", "stream")}
        return json.dumps(obj, ensure_ascii=False).encode("utf-8")
    return raw


@router.post("/characters/export", response_model=None)
async def export_card(users: UsersDep, service: RoleplayDep, params: ParamsDep) -> Response:
    """Export a character as a V2 card: `format=png` (default; the avatar, or a blank image, with a
    `chara` chunk) or `format=json`."""
    from rwkv_gateway.domain import cards

    account = await _account(users, params)
    fields, extra = await service.characters.fields(account, params.text("character_name"))
    card = cards.CardCharacter(
        name=fields.bot,
        persona=fields.bot_persona,
        greeting=fields.greeting,
        example_message=fields.example_message,
        user_alias=fields.user,
        avatar=fields.avatar,
        extra=extra,
    )
    fmt = (params.text("format") or "png").strip().lower()
    if fmt == "json":
        body = json.dumps(cards.card_json_v2(card), ensure_ascii=False).encode("utf-8")
        return Response(body, media_type="application/json; charset=utf-8")
    if fmt != "png":
        raise RoleplayFailure("参数错误：format 只能是 png 或 json")
    return Response(
        cards.card_png_v2(card),
        media_type="image/png",
        headers={"Content-Disposition": _attachment(f"{fields.bot}.png")},
    )


def _attachment(filename: str) -> str:
    from urllib.parse import quote

    return f"attachment; filename=\"card.png\"; filename*=UTF-8''{quote(filename)}"


# ---------------------------------------------------------------------------- composition


def error_scopes() -> list[tuple[str, ErrorRenderer]]:
    """(path, renderer) pairs for errors raised outside this dialect's routes (404, 405, 500).

    Exact paths only: `/chat` (no slash) and `/chat-stream` belong to the ChatGLM dialect.
    """
    renderer = RoleplayErrors()
    return [(path, renderer) for path in PATHS]


def cors_scope(settings: Settings) -> tuple[tuple[str, ...], CORSPolicy]:
    """These paths and their CORS policy (docs/roleplay.md#5-cors): the UI's origin echoed, and a
    preflight answered 204."""
    policy = CORSPolicy(tuple(settings.roleplay_cors_origins), credentials=True, preflight_status=204)
    return PATHS, policy


def install(app: FastAPI, settings: Settings) -> None:
    """The static UI, mounted last so that it never shadows an API route. Call after every router is
    added."""
    if settings.ui_dir is not None:
        ui_dir = Path(settings.ui_dir)
        if not (ui_dir / "index.html").is_file():
            raise GatewayError(f"--ui-dir {ui_dir} has no index.html (use the UI build's dist/ folder)")
        app.mount("/", StaticFiles(directory=ui_dir, html=True), name="roleplay-ui")
