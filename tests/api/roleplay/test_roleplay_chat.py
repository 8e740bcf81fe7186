"""Role-play conversations end to end: exact stream bytes of a greedy reply, the non-streaming form,
state snapshots per node (reply prefills only the new turn; resay, tamper, back, reset re-prefill
nothing; the result equals a fresh conversation fed the same transcript), restarts, isolation between
users, the per-character lock, client disconnects and guest expiry."""

# ruff: noqa: RUF001, RUF002

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update

from rwkv_gateway.api.roleplay.router import reply_texts
from rwkv_gateway.api.roleplay.streaming import reply_events
from rwkv_gateway.db.base import utcnow
from rwkv_gateway.db.models import Character, ConversationNode, User
from rwkv_gateway.domain.types import (
    Finish,
    FinishReason,
    GenerationRequest,
    TextDelta,
    Usage,
)
from rwkv_gateway.services.roleplay_prompts import (
    AVOID_REPEAT,
    CardText,
    persona_block,
    sampling_params,
    user_turn,
)
from rwkv_gateway.services.roleplay_types import NewReply, ReplyJob

if TYPE_CHECKING:
    from conftest import RP, Factory

from conftest import CARD, GREEDY, REPLY_TOKENS, stop, ui_body  # type: ignore[import-not-found]
from support.postgres import BOTH

DB_BACKENDS = BOTH
POSTGRESQL_SLOW = True  # the README's command stays under 5 minutes; CI runs these in the slow tier


def env(message: str, code: int) -> bytes:
    return json.dumps({"data": None, "message": message, "code": code}, ensure_ascii=False).encode()


def frames(body: str) -> list[str]:
    """The cumulative texts of a reply stream, checking the framing: each event is "\\n\\ndata: " + text."""
    assert body.startswith("\n\ndata: ")
    return body.split("\n\ndata: ")[1:]


class Scripted:
    """A token stream that replays given events (a scripted token source)."""

    def __init__(self, events: list[Any]) -> None:
        self.events = events
        self.cancelled = False
        self.request = GenerationRequest()
        self.prompt_token_count = 0

    async def __aiter__(self) -> Any:
        for event in self.events:
            yield event

    def cancel(self) -> None:
        self.cancelled = True

    async def collect(self) -> Any:  # pragma: no cover - not used
        raise NotImplementedError


class Saving:
    """Stands in for the service's save step: records the replies it is asked to store."""

    def __init__(self) -> None:
        self.saved: list[tuple[str, str]] = []

    async def save_reply(self, job: ReplyJob) -> None:
        assert job.reply is not None
        self.saved.append((job.reply.raw, job.reply.final))


def scripted_job(stream: Scripted, release: Any = lambda: None) -> ReplyJob:
    return ReplyJob(None, stream, NewReply(1, None), release)  # type: ignore[arg-type]


async def body_of(job: ReplyJob, service: Saving) -> bytes:
    """The streamed body of a job, through the route's path (texts, the save step, the final text)."""
    return b"".join([chunk async for chunk in reply_events(reply_texts(service, job))])  # type: ignore[arg-type]


async def test_stream_framing_example() -> None:
    """docs/roleplay.md#11-the-reply-stream: tokens " 你", "好", "！", "\\n\\n" give exactly this body."""
    service = Saving()
    released: list[bool] = []
    finish = Finish(FinishReason.STOP, Usage(), state=object(), stop_matched="\n\n")  # type: ignore[arg-type]
    stream = Scripted([TextDelta(" 你", (1,)), TextDelta("好", (2,)), TextDelta("！", (3,)), finish])
    job = scripted_job(stream, lambda: released.append(True))
    body = await body_of(job, service)
    assert body == "\n\ndata:  你\n\ndata:  你好\n\ndata:  你好！\n\ndata: 你好！".encode()
    assert service.saved == [(" 你好！", "你好！")]
    assert released == [True] and stream.cancelled


async def test_stream_that_fails_persists_nothing() -> None:
    service = Saving()
    stream = Scripted([TextDelta(" 你", (1,)), Finish(FinishReason.ERROR, Usage(), error="boom")])
    body = await body_of(scripted_job(stream), service)
    assert body == "\n\ndata:  你".encode()
    assert service.saved == []


def test_sampling_mapping() -> None:
    default = sampling_params()
    assert (default.temperature, default.mirostat_tau, default.mirostat_eta, default.min_p) == (
        1.2,
        3.0,
        0.1,
        0.05,
    )
    assert default.repetition_penalty == 1.2 and not default.penalize_prompt
    assert default.banned_tokens == frozenset({0})
    assert (
        sampling_params(temperature=0).temperature == 0
        and sampling_params(temperature=-1).mirostat_tau is None
    )
    assert sampling_params(tau=0).temperature == 0
    assert sampling_params(presence_penalty=-1).repetition_penalty == 1.2
    assert sampling_params(min_p=1).min_p == 0.0
    # The reference's order: truncation and min-p at temperature 1, then the temperature (section 6.2).
    assert default.temperature_last and default.mirostat_variant == "rwkv"


async def test_replies_ban_the_punctuation_just_consumed(rp: RP, monkeypatch: Any) -> None:
    engine = rp.app.state.services.model.engine
    seen: list[GenerationRequest] = []
    real_submit = engine.submit

    async def spy(request: GenerationRequest) -> Any:
        seen.append(request)
        return await real_submit(request)

    monkeypatch.setattr(engine, "submit", spy)
    me = await rp.guest()
    c = {**me, "character_name": "小雪"}
    await rp.ok("/characters/save", {**me, **CARD})
    await rp.ok("/characters/load", c)
    await rp.raw("/chat/reply", {**c, "prompt": "你好", **GREEDY})
    await rp.raw("/chat/resay", {**c, **GREEDY})
    replies = [r for r in seen if r.max_tokens > 0]
    assert len(replies) == 2
    colon = engine.codec.encode(":")
    assert len(colon) == 1
    turn = user_turn(card_text_of(CARD), "你好")
    for request in replies:
        assert colon[0] in request.sampling.avoid_repeat_tokens
        assert len(request.sampling.avoid_repeat_tokens) >= 10
        assert request.sampling.preceding_token == engine.codec.encode(turn)[-1]


async def _expected_greedy(rp: RP, prefix_parts: list[str], max_tokens: int) -> list[str]:
    """Greedy reply texts computed on the engine directly: each part fed from the previous state."""
    engine = rp.app.state.services.model.engine
    state = None
    for part in prefix_parts:
        s = await engine.submit(
            GenerationRequest(
                prompt=part, initial_state=state, max_tokens=0, return_state=True, use_prefix_cache=False
            )
        )
        _, fin = await s.collect()
        state = fin.state
    avoid = frozenset(ids[0] for ids in map(engine.codec.encode, AVOID_REPEAT) if len(ids) == 1)
    sampling = replace(
        sampling_params(**{k: float(v) for k, v in GREEDY.items()}),
        avoid_repeat_tokens=avoid,
        preceding_token=engine.codec.encode(prefix_parts[-1])[-1],
    )
    s = await engine.submit(
        GenerationRequest(
            initial_state=state,
            sampling=sampling,
            max_tokens=max_tokens,
            stop=("\n\n",),
            stop_on_eos=False,
            use_prefix_cache=False,
        )
    )
    texts, text = [], ""
    async for event in s:
        if isinstance(event, TextDelta):
            text += event.text
            texts.append(text)
    return texts


async def test_exact_stream_bytes_of_a_greedy_reply(rp: RP) -> None:
    me = await rp.guest()
    c = {**me, "character_name": "小雪"}
    await rp.ok("/characters/save", {**me, **CARD})
    await rp.ok("/characters/load", c)
    resp = await rp.raw("/chat/reply", {**c, "prompt": " 你好\n", **GREEDY})
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert resp.headers["cache-control"] == "no-cache" and resp.headers["x-accel-buffering"] == "no"
    card = card_text_of(CARD)
    expected = await _expected_greedy(rp, [persona_block(card), user_turn(card, "你好")], REPLY_TOKENS)
    assert len(expected) >= 1
    final = expected[-1]  # the cap, not a blank line, ended it on this model: kept as generated
    assert resp.text == "".join("\n\ndata: " + t for t in [*expected, final])
    assert resp.content.decode("utf-8")  # never a partial character
    chat = await rp.ok("/characters/load", c)
    assert chat["chat"][-1] == ["你好", final]


def card_text_of(card: dict[str, str]) -> CardText:
    return CardText(
        card["user"],
        card["bot"],
        card["greeting"],
        card["bot_persona"],
        card["example_message"],
        bool(card["use_qa"]),
    )


async def test_non_streaming_form_matches_the_stream(rp: RP) -> None:
    me = await rp.guest()
    c = {**me, "character_name": "星野"}
    await rp.ok("/characters/load", c)
    streamed = frames((await rp.raw("/chat/reply", {**c, "prompt": "你好", **GREEDY})).text)[-1]
    data = await rp.ok("/chat/resay", {**c, **GREEDY, "stream": "0"})
    assert data == {"reply": streamed}
    resp = await rp.client.post("/chat/resay", json={**c, **GREEDY, "stream": False})
    assert json.loads(resp.content)["data"] == {"reply": streamed}


async def _reply(rp: RP, c: dict[str, str], prompt: str, sampling: dict[str, str] = GREEDY) -> str:
    return frames((await rp.raw("/chat/reply", {**c, "prompt": prompt, **sampling})).text)[-1]


async def test_state_correctness_after_resay_tamper_and_back(rp: RP) -> None:
    """Replies continue from per-node snapshots: after replies, a (sampled) resay, a tamper and a
    back, greedy replies equal those of a fresh conversation given the same transcript."""
    engine = rp.app.state.services.model.engine
    me = await rp.guest()
    c = {**me, "character_name": "小雪"}
    await rp.ok("/characters/save", {**me, **CARD})
    await rp.ok("/characters/load", c)
    await _reply(rp, c, "第一句")
    await _reply(rp, c, "第二句")
    # A sampled resay replaces the second reply; a tamper replaces it again.
    await rp.ok("/chat/resay", {**c, "tau": "5", "temperature": "1.5", "stream": "0"})
    await rp.ok("/chat/tamper", {**c, "message": "（点头）好的。"})
    await _reply(rp, c, "第三句", {**GREEDY, "temperature": "1.3"})
    before = engine.stats()["prompt_tokens"]
    await rp.ok("/chat/back", {**c, "log_index": "2"})
    assert engine.stats()["prompt_tokens"] == before  # back re-prefills nothing
    turn = user_turn(card_text_of(CARD), "第四句")
    r4 = await _reply(rp, c, "第四句")
    # Only the new user turn was prefilled.
    assert engine.stats()["prompt_tokens"] - before == len(engine.codec.encode(turn))
    r5 = await _reply(rp, c, "第五句")
    chat = (await rp.ok("/characters/load", c))["chat"]
    assert [row[0] for row in chat] == [None, "第一句", "第二句", "第四句", "第五句"]
    assert chat[2][1] == "（点头）好的。"
    original = await rp.ok("/debug/token", c)

    # A fresh conversation (another user, same card) fed the same transcript: greedy replies, and
    # tamper where the original's text came from elsewhere.
    other = await rp.guest()
    o = {**other, "character_name": "小雪"}
    await rp.ok("/characters/save", {**other, **CARD})
    before = engine.stats()["prompt_tokens"]
    await rp.ok("/characters/load", o)
    # Identical characters share one persona state through the state store: nothing prefilled.
    assert engine.stats()["prompt_tokens"] == before
    assert await _reply(rp, o, "第一句") == chat[1][1]
    await _reply(rp, o, "第二句")
    await rp.ok("/chat/tamper", {**o, "message": "（点头）好的。"})
    assert await _reply(rp, o, "第四句") == r4
    assert await _reply(rp, o, "第五句") == r5
    assert await rp.ok("/debug/token", o) == original


async def test_reset_and_back_to_the_greeting(rp: RP) -> None:
    me = await rp.guest()
    c = {**me, "character_name": "星野"}
    first = await rp.ok("/characters/load", c)
    greeting_state = await rp.ok("/debug/token", c)
    r1 = await _reply(rp, c, "你好")
    await rp.ok("/chat/back", {**c, "log_index": "0"})
    # Back to node 0 is the greeting state itself (the reference fed the greeting without its name).
    assert await rp.ok("/debug/token", c) == greeting_state
    assert (await rp.raw("/chat/resay", {**c, **GREEDY})).content == env("尚未开始对话", 400)
    assert await _reply(rp, c, "你好") == r1
    before = rp.app.state.services.model.engine.stats()["prompt_tokens"]
    assert await rp.ok("/chat/reset", c) == first
    assert (
        rp.app.state.services.model.engine.stats()["prompt_tokens"] == before
    )  # the persona state is reused
    assert await rp.ok("/debug/token", c) == greeting_state


async def test_restart_continues_identically(rp_factory: Factory, tmp_path: Any) -> None:
    data_dir = tmp_path / "persist"
    rp = await rp_factory(data_dir=data_dir)
    me = await rp.user("carol")
    c = {**me, "character_name": "星野"}
    await rp.ok("/characters/load", c)
    await _reply(rp, c, "第一句")
    await _reply(rp, c, "第二句")
    chat = await rp.ok("/characters/load", c)
    debug = await rp.ok("/debug/token", c)
    r3 = await _reply(rp, c, "第三句")
    await rp.ok("/chat/back", {**c, "log_index": "2"})
    await stop(rp)

    again = await rp_factory(data_dir=data_dir)
    assert await again.ok("/characters/load", c) == chat  # the token survives too
    assert await again.ok("/debug/token", c) == debug
    before = again.app.state.services.model.engine.stats()["prompt_tokens"]
    assert await _reply(again, c, "第三句") == r3
    # Continued from the persisted snapshot: only the new turn was prefilled.
    turn = user_turn(card_text_of({**await again.ok("/characters/get", c), "use_qa": ""}), "第三句")
    assert again.app.state.services.model.engine.stats()["prompt_tokens"] - before == len(
        again.app.state.services.model.engine.codec.encode(turn)
    )


async def test_users_cannot_see_each_other(rp: RP) -> None:
    a = await rp.user("anna")
    b = await rp.user("ben")
    await rp.ok("/characters/save", {**a, **CARD})
    await rp.ok("/characters/load", {**a, "character_name": "小雪"})
    await _reply(rp, {**a, "character_name": "小雪"}, "秘密")
    assert [e["char_name"] for e in (await rp.ok("/characters/list", b))["list"]] == ["星野"]
    bc = {**b, "character_name": "小雪"}
    assert (await rp.raw("/characters/get", bc)).content == env("角色不存在", 400)
    assert (await rp.raw("/chat/reply", {**bc, "prompt": "x"})).content == env("尚未加载角色", 400)
    assert (await rp.raw("/debug/token", bc)).content == env("尚未开始对话", 400)
    await rp.ok("/characters/del", bc)  # deletes nothing of anna's
    # Anna's token does not work for ben's name, and the other way round.
    assert (await rp.raw("/characters/list", {"user_name": "ben", "token": a["token"]})).content == env(
        "token失效，请重新登录", 403
    )
    chat = await rp.ok("/characters/load", {**a, "character_name": "小雪"})
    assert chat["chat"][1][0] == "秘密"


async def test_one_reply_at_a_time(rp: RP) -> None:
    me = await rp.guest()
    c = {**me, "character_name": "星野"}
    await rp.ok("/characters/load", c)
    service = rp.app.state.services.roleplay
    account = await rp.app.state.services.users.authenticate(me["user_name"], me["token"])
    job = await service.reply(account, "星野", "你好", sampling_params(temperature=0))
    busy = env("角色正在回复中，请稍后再试", 400)
    assert (await rp.raw("/chat/reply", {**c, "prompt": "又来", **GREEDY})).content == busy
    assert (await rp.raw("/chat/resay", {**c, **GREEDY})).content == busy
    assert (await rp.raw("/chat/reset", c)).content == busy
    assert (await rp.raw("/chat/back", {**c, "log_index": "0"})).content == busy
    assert (await rp.raw("/characters/save", {**me, **CARD, "bot": "星野"})).content == busy
    # Other characters are not blocked.
    await rp.ok("/characters/save", {**me, **CARD})
    texts = [text async for text in reply_texts(service, job)]
    final = texts[-1]
    chat = await rp.ok("/characters/load", c)
    assert chat["chat"][-1] == ["你好", final]
    await _reply(rp, c, "又来")


async def _post_and_disconnect(rp: RP, path: str, fields: dict[str, str], after_chunks: int) -> list[bytes]:
    """Drive the ASGI app directly: read `after_chunks` body chunks, then disconnect."""
    body = ui_body(fields).encode()
    chunks: list[bytes] = []
    gone = asyncio.Event()
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            chunks.append(message["body"])
            if len(chunks) >= after_chunks:
                gone.set()

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/x-www-form-urlencoded"), (b"host", b"test")],
        "client": ("127.0.0.1", 1),
        "server": ("test", 80),
    }
    await asyncio.wait_for(rp.app(scope, receive, send), 60)
    return chunks


async def test_disconnect_mid_reply_drops_the_turn(rp_factory: Factory) -> None:
    rp = await rp_factory(roleplay_max_reply_tokens=64)
    me = await rp.guest()
    c = {**me, "character_name": "星野"}
    await rp.ok("/characters/load", c)
    r1 = await _reply(rp, c, "你好")
    before_chat = await rp.ok("/characters/load", c)
    before_debug = await rp.ok("/debug/token", c)
    chunks = await _post_and_disconnect(rp, "/chat/reply", {**c, "prompt": "再说", **GREEDY}, after_chunks=2)
    assert 2 <= len(chunks) < 64
    # Nothing was kept: the chat and its state are as before, and the lock is free again.
    assert await rp.ok("/characters/load", c) == before_chat
    assert await rp.ok("/debug/token", c) == before_debug
    chunks = await _post_and_disconnect(rp, "/chat/resay", {**c, **GREEDY}, after_chunks=1)
    assert await rp.ok("/characters/load", c) == before_chat
    assert await _reply(rp, c, "再说")
    await rp.ok("/chat/back", {**c, "log_index": "1"})
    assert await rp.ok("/characters/load", c) == before_chat
    assert (await rp.ok("/chat/resay", {**c, **GREEDY, "stream": "0"}))["reply"] == r1


async def test_idle_guests_are_removed(rp: RP) -> None:
    old = await rp.guest()
    fresh = await rp.guest()
    await rp.ok("/characters/load", {**old, "character_name": "星野"})
    await _reply(rp, {**old, "character_name": "星野"}, "你好")
    async with rp.app.state.services.storage.sessions() as session:
        await session.execute(
            update(User)
            .where(User.name == old["user_name"])
            .values(last_seen_at=utcnow() - timedelta(hours=25))
        )
        await session.commit()
    assert await rp.app.state.services.roleplay.guests.sweep(rp.settings.roleplay_guest_ttl_s) == 1
    assert (await rp.raw("/characters/list", old)).content == env("用户不存在", 400)
    await rp.ok("/characters/list", fresh)


async def test_an_incomplete_character_at_the_cap_is_dropped() -> None:
    service = Saving()
    cap = Finish(FinishReason.LENGTH, Usage(), state=object())  # type: ignore[arg-type]
    stream = Scripted([TextDelta(" 你", (1,)), TextDelta("\ufffd", ()), cap])
    body = await body_of(scripted_job(stream), service)
    assert body == "\n\ndata:  你\n\ndata:  你".encode()
    assert [final for _, final in service.saved] == [" 你"]
    # A replacement character in the middle of a reply is real text and is sent.
    stream = Scripted([TextDelta(" \ufffd", (1,)), TextDelta("好", (2,)), cap])
    body = await body_of(scripted_job(stream), service)
    assert body == "\n\ndata:  \ufffd\n\ndata:  \ufffd好\n\ndata:  \ufffd好".encode()


async def test_rewind_index_arithmetic_of_the_ui(rp: RP) -> None:
    """The UI rewinds bubble k (newest first) to (bubbles - k - 1) / 2 and then shows 2i + 1 bubbles
    (docs/roleplay.md#15-what-the-ui-relies-on); over a 3-turn chat that must keep exactly the rows
    up to that bubble's row."""
    me = await rp.guest()
    c = {**me, "character_name": "星野"}
    await rp.ok("/characters/load", c)
    for prompt in ("一", "二", "三"):
        await _reply(rp, c, prompt)
    full = (await rp.ok("/characters/load", c))["chat"]
    bubbles = [text for row in full for text in row if text]
    assert len(bubbles) == 7
    newest_first = bubbles[::-1]
    for k in range(0, 7, 2):  # the bot bubbles (the UI offers rewind on them)
        index = (len(bubbles) - k - 1) // 2
        await rp.ok("/chat/back", {**c, "log_index": str(index)})
        rows = (await rp.ok("/characters/load", c))["chat"]
        assert rows == full[: index + 1]
        shown = [text for row in rows for text in row if text]
        assert len(shown) == 2 * index + 1 and shown[-1] == newest_first[k]
        # Put the chat back for the next bubble.
        for row in full[index + 1 :]:
            await rp.ok("/chat/reply", {**c, "prompt": row[0], **GREEDY, "stream": "0"})
        assert (await rp.ok("/characters/load", c))["chat"] == full


async def test_lost_snapshots_are_rebuilt_from_the_text(rp: RP) -> None:
    me = await rp.guest()
    c = {**me, "character_name": "星野"}
    await rp.ok("/characters/load", c)
    await _reply(rp, c, "第一句")
    await _reply(rp, c, "第二句")
    debug = await rp.ok("/debug/token", c)
    async with rp.app.state.services.storage.sessions() as session:
        keys = (await session.scalars(select(ConversationNode.state_key))).all()
    store = rp.app.state.services.model.engine.snapshots
    for key in keys:
        if key is not None:
            store.delete(key)  # persona and node states alike
    before = rp.app.state.services.model.engine.stats()["prompt_tokens"]
    await rp.ok("/chat/resay", {**c, **GREEDY, "stream": "0"})
    # The persona, the greeting row and the first turn were prefilled again from their text.
    rebuilt = rp.app.state.services.model.engine.stats()["prompt_tokens"] - before
    assert rebuilt >= debug["token_count"] - 2 * REPLY_TOKENS
    assert (await rp.ok("/debug/token", c))["token_state"].startswith(debug["token_state"][:-20])
    await rp.ok("/chat/back", {**c, "log_index": "1"})
    await _reply(rp, c, "第三句")
    chat = (await rp.ok("/characters/load", c))["chat"]
    assert [row[0] for row in chat] == [None, "第一句", "第三句"]


async def test_editing_a_character_resets_its_chat(rp: RP) -> None:
    me = await rp.guest()
    c = {**me, "character_name": "小雪"}
    await rp.ok("/characters/save", {**me, **CARD})
    await rp.ok("/characters/load", c)
    await _reply(rp, c, "你好")
    await rp.ok("/characters/save", {**me, **CARD, "greeting": "新的开场白"})
    assert (await rp.raw("/chat/reply", {**c, "prompt": "x", **GREEDY})).content == env("尚未加载角色", 400)
    assert await rp.ok("/characters/load", c) == {"chat": [[None, "新的开场白"]]}
    # An empty greeting gives an empty history.
    me2 = await rp.guest()
    await rp.ok("/characters/save", {**me2, **CARD, "greeting": "开场"})
    async with rp.app.state.services.storage.sessions() as session:
        # The API refuses an empty greeting; an imported card may have none.
        await session.execute(update(Character).where(Character.greeting == "开场").values(greeting=""))
        await session.commit()
    assert await rp.ok("/characters/load", {**me2, "character_name": "小雪"}) == {"chat": []}
    await _reply(rp, {**me2, "character_name": "小雪"}, "你好")
    rows = (await rp.ok("/characters/load", {**me2, "character_name": "小雪"}))["chat"]
    assert len(rows) == 1 and rows[0][0] == "你好"
