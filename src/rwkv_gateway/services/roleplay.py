"""Role-play conversations: characters, chats with a state snapshot per dialogue node, replies.

This service owns what the role-play routes do to the database and the engine. A chat is a linear
path of `ConversationNode`s: a system node (the persona block, whose state is the character's cached
persona state), the greeting (a bot node sharing that state), then per turn a user node whose state
is the pre-reply state (just after `"{user}: {prompt}\\n\\n{bot}:"`) and a bot node whose state is
the state after the reply and its `"\\n\\n"`. Every node state is a snapshot persisted in the
engine's state store, so a reply prefills only the new user turn, resay restarts from the pre-reply
snapshot, tamper feeds only the replacement text, back restores node i's snapshot and reset reuses the
persona state, none of them re-prefilling history. A snapshot that is missing (or was made by another
model) is rebuilt from the nodes' text.

Consistency rules: one operation at a time per (user, character) (`角色正在回复中，请稍后再试` while
a reply or resay runs), short DB sessions never held across a stream, snapshots written before the
transaction that references them, and a reply whose client disconnects is dropped: nothing is
persisted, so the chat stays exactly as before the request.
"""

# ruff: noqa: RUF002  (the reference's messages use full-width punctuation)

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from rwkv_gateway.db.base import utcnow
from rwkv_gateway.db.models import Character, Conversation, ConversationNode
from rwkv_gateway.db.repo import CharacterRepo, ConversationRepo, UserRepo
from rwkv_gateway.domain.engine import Engine, SnapshotStore
from rwkv_gateway.domain.types import (
    Finish,
    FinishReason,
    GenerationRequest,
    SamplingParams,
    Snapshot,
)
from rwkv_gateway.errors import GatewayError, GenerationFailed
from rwkv_gateway.services.roleplay_prompts import (
    AVOID_REPEAT,
    NODE_KEY_PREFIX,
    PERSONA_KEY_PREFIX,
    REPLY_STOP,
    CardText,
    persona_block,
    said_for_character,
    user_turn,
    valid_name,
)
from rwkv_gateway.services.roleplay_types import (
    MSG_AVATAR_TOO_LARGE,
    MSG_BAD_NAME,
    MSG_BUSY,
    MSG_EMPTY,
    MSG_NO_CHARACTER,
    MSG_NO_NODE,
    MSG_NOT_LOADED,
    MSG_NOT_STARTED,
    Account,
    CardFields,
    ReplyJob,
    RoleplayFailure,
    Row,
)
from rwkv_gateway.services.users import character_row, delete_user_rows

logger = logging.getLogger(__name__)

DIALECT = "roleplay"


@dataclass(slots=True)
class _Guard:
    """Serialises the operations on one (user, character); `replying` marks a reply holding it."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    replying: bool = False


@dataclass(frozen=True, slots=True)
class _Turn:
    """One history row and the nodes behind it."""

    user: ConversationNode | None
    bot: ConversationNode | None

    def row(self) -> Row:
        return [None if self.user is None else self.user.text, None if self.bot is None else self.bot.text]


@dataclass(slots=True)
class _Chat:
    character: Character
    conversation: Conversation
    nodes: list[ConversationNode]

    @property
    def turns(self) -> list[_Turn]:
        turns: list[_Turn] = []
        for node in self.nodes:
            if node.role == "user":
                turns.append(_Turn(node, None))
            elif node.role == "bot":
                if turns and turns[-1].user is not None and turns[-1].bot is None:
                    turns[-1] = _Turn(turns[-1].user, node)
                else:
                    turns.append(_Turn(None, node))
        return turns

    @property
    def last(self) -> ConversationNode:
        return self.nodes[-1]


def card_text(character: Character) -> CardText:
    return CardText(
        user=character.user_alias,
        bot=character.name,
        greeting=character.greeting,
        bot_persona=character.persona,
        example_message=character.example_message,
        use_qa=character.use_qa,
    )


def card_dict(character: Character) -> dict[str, Any]:
    """The card as `/characters/get` returns it: the reference's save layout and key order, which are
    CardFields' fields in order."""
    return asdict(card_fields(character))


def card_fields(character: Character) -> CardFields:
    return CardFields(
        user=character.user_alias,
        bot=character.name,
        greeting=character.greeting,
        bot_persona=character.persona,
        example_message=character.example_message,
        use_qa=character.use_qa,
        avatar=character.avatar,
    )


class _MemoryStore:
    """Stands in for the engine's state store when it has none (snapshots then last until restart)."""

    def __init__(self) -> None:
        self._snaps: dict[str, Any] = {}

    def put(self, key: str, snap: Any, *, persist: bool = False) -> None:  # noqa: ARG002
        self._snaps[key] = snap

    def get(self, key: str) -> Any | None:
        return self._snaps.get(key)

    def delete(self, key: str) -> None:
        self._snaps.pop(key, None)


class RoleplayService:
    """Characters and conversations of role-play users (see the module docstring)."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        engine: Callable[[], Engine],
        *,
        max_reply_tokens: int = 512,
        max_avatar_bytes: int = 2**20,
    ) -> None:
        self._sessions = sessions
        self._engine = engine
        self._max_reply_tokens = max_reply_tokens
        self._max_avatar_bytes = max_avatar_bytes
        self._guards: dict[tuple[int, str], _Guard] = {}
        self._fallback_store = _MemoryStore()
        #: Token ids of AVOID_REPEAT in the served vocabulary (found on first use).
        self._avoid_repeat: frozenset[int] | None = None

    # -- plumbing ------------------------------------------------------------------------------------

    def _store(self, engine: Engine) -> SnapshotStore:
        store = engine.snapshots
        return store if store is not None else self._fallback_store

    def _guard(self, account: Account, name: str) -> _Guard:
        return self._guards.setdefault((account.id, name), _Guard())

    @contextlib.asynccontextmanager
    async def _exclusive(self, account: Account, name: str) -> AsyncIterator[None]:
        """Hold the (user, character) guard for a short operation; busy while a reply holds it."""
        guard = self._guard(account, name)
        if guard.replying:
            raise RoleplayFailure(MSG_BUSY)
        async with guard.lock:
            yield

    async def _claim_for_reply(self, account: Account, name: str) -> _Guard:
        guard = self._guard(account, name)
        if guard.replying or guard.lock.locked():
            raise RoleplayFailure(MSG_BUSY)
        await guard.lock.acquire()
        guard.replying = True
        return guard

    @staticmethod
    def _release_reply(guard: _Guard) -> None:
        guard.replying = False
        guard.lock.release()

    @contextlib.asynccontextmanager
    async def _claimed_chat(self, account: Account, name: str) -> AsyncIterator[tuple[_Guard, _Chat]]:
        """Claim (user, character) for a reply and load its chat. If the body fails (before the reply
        is admitted) the claim is released again; otherwise the reply job releases it when it ends."""
        checked = valid_name(name)
        if checked is None:
            raise RoleplayFailure(MSG_NOT_LOADED)
        guard = await self._claim_for_reply(account, checked)
        try:
            async with self._sessions() as session:
                chat = await self._chat_of(session, account, checked)
            if chat is None:
                raise RoleplayFailure(MSG_NOT_LOADED)
            yield guard, chat
        except BaseException:
            self._release_reply(guard)
            raise

    async def _get_state(self, engine: Engine, key: str | None) -> Snapshot | None:
        if key is None:
            return None
        try:
            snap = await asyncio.to_thread(self._store(engine).get, key)
        except GatewayError as exc:  # a file made by another model, or corrupt: rebuilt from text
            logger.warning("role-play state %s unusable: %s", key, exc.message)
            return None
        return snap if isinstance(snap, Snapshot) else None

    async def _put_state(self, engine: Engine, key: str, snap: Snapshot) -> None:
        await asyncio.to_thread(self._store(engine).put, key, snap, persist=True)

    async def _delete_states(self, engine: Engine | None, keys: list[str]) -> None:
        if engine is None or not keys:
            return
        store = self._store(engine)

        def drop() -> None:
            for key in keys:
                try:
                    store.delete(key)
                except Exception:
                    logger.exception("deleting role-play state %s failed", key)

        await asyncio.to_thread(drop)

    def _engine_or_none(self) -> Engine | None:
        try:
            return self._engine()
        except GatewayError:
            return None

    async def _feed(self, engine: Engine, state: Snapshot | None, text: str, account: Account) -> Snapshot:
        """The state after feeding `text` (from `state`, or from the empty state)."""
        request = GenerationRequest(
            prompt=text,
            initial_state=state,
            max_tokens=0,
            return_state=True,
            use_prefix_cache=False,
            dialect=DIALECT,
            user=account.name,
        )
        stream = await engine.submit(request)
        _, finish = await stream.collect()
        if finish.state is None:
            raise GenerationFailed(finish.error or "prefilling the role-play context failed")
        return finish.state

    @staticmethod
    def _persona_key(engine: Engine, block: str) -> str:
        # By content (and model): users with identical characters share one persona state.
        digest = hashlib.sha256(f"{engine.info.model_id}\0{block}".encode("utf-8", "surrogatepass"))
        return PERSONA_KEY_PREFIX + digest.hexdigest()

    async def _persona_state(self, engine: Engine, card: CardText, account: Account) -> tuple[str, Snapshot]:
        block = persona_block(card)
        key = self._persona_key(engine, block)
        snap = await self._get_state(engine, key)
        if snap is None:
            snap = await self._feed(engine, None, block, account)
            await self._put_state(engine, key, snap)
        return key, snap

    async def _node_state(self, engine: Engine, chat: _Chat, index: int, account: Account) -> Snapshot:
        """The snapshot after node `index`. One that is missing (or was made by another model) is
        rebuilt from the nodes' text, starting at the nearest earlier node whose snapshot exists
        (at worst the persona state), and stored again."""
        start = index
        while True:
            node = chat.nodes[start]
            snap = await self._get_state(engine, node.state_key)
            if snap is not None:
                break
            if node.role == "system" or (start == 1 and chat.nodes[0].role == "system"):
                # The persona block (greeting line included) is the state of these two nodes.
                _, snap = await self._persona_state(engine, card_text(chat.character), account)
                break
            start -= 1
        for node in chat.nodes[start + 1 : index + 1]:
            logger.info("rebuilding role-play state of node %s from its text", node.id)
            snap = await self._feed(engine, snap, node.context_text or "", account)
            if node.state_key is not None:
                await self._put_state(engine, node.state_key, snap)
        return snap

    @staticmethod
    def _new_key() -> str:
        return NODE_KEY_PREFIX + uuid.uuid4().hex

    # -- reading -------------------------------------------------------------------------------------

    async def _character(self, session: AsyncSession, account: Account, name: str | None) -> Character | None:
        checked = valid_name(name)
        if checked is None:
            return None
        return await CharacterRepo(session).get(account.id, checked)

    async def _chat(self, session: AsyncSession, character: Character) -> _Chat | None:
        conversations = ConversationRepo(session)
        conversation = await conversations.get(character.user_id, character.id)
        if conversation is None:
            return None
        nodes = list(await conversations.nodes(conversation.id))
        if not nodes:
            return None
        return _Chat(character, conversation, nodes)

    async def _chat_of(self, session: AsyncSession, account: Account, name: str | None) -> _Chat | None:
        character = await self._character(session, account, name)
        return None if character is None else await self._chat(session, character)

    # -- characters ----------------------------------------------------------------------------------

    async def list_characters(self, account: Account) -> list[dict[str, Any]]:
        async with self._sessions() as session:
            chars = await CharacterRepo(session).list(account.id)
        entries = [
            {"char_name": c.name, "file_name": f"{c.name}.json", "avatar": c.avatar or None} for c in chars
        ]
        return sorted(entries, key=lambda e: e["file_name"])

    async def get_character(self, account: Account, name: str | None) -> dict[str, Any]:
        if not name:
            raise RoleplayFailure(MSG_EMPTY)
        async with self._sessions() as session:
            character = await self._character(session, account, name)
            if character is None:
                raise RoleplayFailure(MSG_NO_CHARACTER)
            return card_dict(character)

    async def character_fields(self, account: Account, name: str | None) -> tuple[CardFields, dict[str, Any]]:
        """The card and its stored extra card fields (for export)."""
        if not name:
            raise RoleplayFailure(MSG_EMPTY)
        async with self._sessions() as session:
            character = await self._character(session, account, name)
            if character is None:
                raise RoleplayFailure(MSG_NO_CHARACTER)
            extra = json.loads(character.card_extra) if character.card_extra else {}
            return card_fields(character), extra if isinstance(extra, dict) else {}

    def check_card(self, card: CardFields, *, require_greeting: bool = True) -> CardFields:
        """Required fields, the name rule, then the avatar cap (docs/roleplay.md#9-characters)."""
        if not card.user or not card.bot or (require_greeting and not card.greeting) or not card.bot_persona:
            raise RoleplayFailure(MSG_EMPTY)
        bot = valid_name(card.bot)
        if bot is None:
            raise RoleplayFailure(MSG_BAD_NAME)
        avatar = card.avatar if card.avatar not in (None, "", "null", "undefined") else None
        if avatar is not None and len(avatar.encode("utf-8")) > self._max_avatar_bytes:
            raise RoleplayFailure(MSG_AVATAR_TOO_LARGE)
        example = card.example_message if card.example_message not in ("null", "undefined") else ""
        return CardFields(card.user, bot, card.greeting, card.bot_persona, example, card.use_qa, avatar)

    async def save_character(
        self,
        account: Account,
        card: CardFields,
        *,
        extra: dict[str, Any] | None = None,
        require_greeting: bool = True,
    ) -> None:
        """Create or overwrite a card; its chat and cached persona state are dropped (as the reference)."""
        card = self.check_card(card, require_greeting=require_greeting)
        async with self._exclusive(account, card.bot):
            async with self._sessions() as session:
                chars = CharacterRepo(session)
                character = await chars.get(account.id, card.bot)
                keys: list[str] = []
                if character is None:
                    character = await chars.add(character_row(account.id, card))
                else:
                    keys = await self._drop_chat(session, character)
                    character.user_alias = card.user
                    character.greeting = card.greeting
                    character.persona = card.bot_persona
                    character.example_message = card.example_message
                    character.use_qa = card.use_qa
                    character.avatar = card.avatar
                    keys += await self._drop_persona(session, character)
                if extra is not None:
                    character.card_extra = json.dumps(extra, ensure_ascii=False) if extra else None
                await session.commit()
            await self._delete_states(self._engine_or_none(), keys)

    async def delete_character(self, account: Account, name: str | None) -> None:
        """Remove a card and its chat; always succeeds (unknown names included)."""
        if not name:
            raise RoleplayFailure(MSG_EMPTY)
        checked = valid_name(name)
        if checked is None:
            return
        async with self._exclusive(account, checked):
            async with self._sessions() as session:
                chars = CharacterRepo(session)
                character = await chars.get(account.id, checked)
                if character is None:
                    return
                keys = await self._drop_chat(session, character)
                keys += await self._drop_persona(session, character)
                await chars.delete(character)
                await session.commit()
            await self._delete_states(self._engine_or_none(), keys)

    async def _drop_chat(self, session: AsyncSession, character: Character) -> list[str]:
        """Delete the character's conversation; returns its node state keys (persona keys excluded)."""
        conversations = ConversationRepo(session)
        keys: list[str] = []
        while (conversation := await conversations.get(character.user_id, character.id)) is not None:
            keys += [
                n.state_key
                for n in await conversations.nodes(conversation.id)
                if n.state_key and n.state_key.startswith(NODE_KEY_PREFIX)
            ]
            await conversations.delete(conversation)
        return keys

    async def _drop_persona(self, session: AsyncSession, character: Character) -> list[str]:
        key = character.persona_state_key
        character.persona_state_key = None
        await session.flush()
        if key is None or await CharacterRepo(session).count_persona_key(key):
            return []
        return [key]

    # -- chats ---------------------------------------------------------------------------------------

    async def load(self, account: Account, name: str | None) -> list[Row]:
        """The chat's rows, creating the chat (greeting only) when there is none. Idempotent."""
        if not name:
            raise RoleplayFailure(MSG_EMPTY)
        async with self._sessions() as session:
            character = await self._character(session, account, name)
            if character is None:
                raise RoleplayFailure(MSG_NO_CHARACTER)
            chat = await self._chat(session, character)
            if chat is not None:
                return [t.row() for t in chat.turns]
        async with self._exclusive(account, character.name):
            return await self._create_chat(account, character.name)

    async def reset(self, account: Account, name: str | None) -> list[Row]:
        """Start the chat over from the cached persona state."""
        if not name:
            raise RoleplayFailure(MSG_EMPTY)
        checked = valid_name(name)
        if checked is None:
            raise RoleplayFailure(MSG_NO_CHARACTER)
        async with self._exclusive(account, checked):
            async with self._sessions() as session:
                character = await CharacterRepo(session).get(account.id, checked)
                if character is None:
                    raise RoleplayFailure(MSG_NO_CHARACTER)
                keys = await self._drop_chat(session, character)
                await session.commit()
            rows = await self._create_chat(account, checked)
            await self._delete_states(self._engine_or_none(), keys)
            return rows

    async def _create_chat(self, account: Account, name: str) -> list[Row]:
        """Create the chat of `name` unless it exists (caller holds the guard); returns its rows."""
        engine = self._engine()
        async with self._sessions() as session:
            character = await CharacterRepo(session).get(account.id, name)
            if character is None:
                raise RoleplayFailure(MSG_NO_CHARACTER)
            chat = await self._chat(session, character)
            if chat is not None:
                return [t.row() for t in chat.turns]
            card = card_text(character)
        key, snap = await self._persona_state(engine, card, account)
        async with self._sessions() as session:
            character = await CharacterRepo(session).get(account.id, name)
            if character is None:
                raise RoleplayFailure(MSG_NO_CHARACTER)
            character.persona_state_key = key
            conversations = ConversationRepo(session)
            conversation = await conversations.add(account.id, character.id)
            system = await conversations.add_node(
                ConversationNode(
                    conversation_id=conversation.id,
                    position=0,
                    role="system",
                    text="",
                    context_text=persona_block(card),
                    state_key=key,
                    token_count=snap.token_count,
                )
            )
            last = system
            if card.greeting:
                last = await conversations.add_node(
                    ConversationNode(
                        conversation_id=conversation.id,
                        parent_id=system.id,
                        position=1,
                        role="bot",
                        text=card.greeting,
                        context_text="",  # the persona block already holds the greeting line
                        state_key=key,
                        token_count=snap.token_count,
                    )
                )
            conversation.current_node_id = last.id
            await session.commit()
        return [[None, card.greeting]] if card.greeting else []

    async def reply(
        self, account: Account, name: str | None, prompt: str | None, sampling: SamplingParams
    ) -> ReplyJob:
        """Admit a reply to `prompt`: the user turn is prefilled from the last node's state before this
        returns; the job streams the reply and persists the turn when it ends normally."""
        name = (name or "").strip()
        prompt = (prompt or "").strip()
        if not name or not prompt:
            raise RoleplayFailure(MSG_EMPTY)
        async with self._claimed_chat(account, name) as (guard, chat):
            engine = self._engine()
            card = card_text(chat.character)
            current = await self._node_state(engine, chat, len(chat.nodes) - 1, account)
            turn_text = user_turn(card, prompt)
            pre = await self._feed(engine, current, turn_text, account)
            request = self._reply_request(engine, pre, turn_text, sampling, account)
            stream = await engine.submit(request)
        last_id, last_position = chat.last.id, chat.last.position
        conversation_id = chat.conversation.id

        async def commit(raw: str, final: str, finish: Finish) -> None:
            assert finish.state is not None
            pre_key, post_key = self._new_key(), self._new_key()
            await self._put_state(engine, pre_key, pre)
            await self._put_state(engine, post_key, finish.state)
            async with self._sessions() as session:
                conversation = await session.get(Conversation, conversation_id)
                if conversation is None or conversation.current_node_id != last_id:
                    raise GenerationFailed("the chat changed while the reply was generated")
                conversations = ConversationRepo(session)
                user_node = await conversations.add_node(
                    ConversationNode(
                        conversation_id=conversation_id,
                        parent_id=last_id,
                        position=last_position + 1,
                        role="user",
                        text=prompt,
                        context_text=turn_text,
                        state_key=pre_key,
                        token_count=pre.token_count,
                    )
                )
                bot_node = await conversations.add_node(
                    ConversationNode(
                        conversation_id=conversation_id,
                        parent_id=user_node.id,
                        position=last_position + 2,
                        role="bot",
                        text=final,
                        context_text=_fed_reply(raw, finish),
                        state_key=post_key,
                        token_count=finish.state.token_count,
                    )
                )
                conversation.current_node_id = bot_node.id
                conversation.updated_at = utcnow()
                await session.commit()

        return ReplyJob(stream, commit, lambda: self._release_reply(guard))

    def _reply_request(
        self, engine: Engine, pre: Snapshot, turn_text: str, sampling: SamplingParams, account: Account
    ) -> GenerationRequest:
        codec = engine.codec
        if self._avoid_repeat is None:
            pieces = [codec.encode(ch) for ch in AVOID_REPEAT]
            self._avoid_repeat = frozenset(ids[0] for ids in pieces if len(ids) == 1)
        # The reply starts from the pre-reply logits; the token consumed last is the user turn's last.
        fed = codec.encode(turn_text)
        sampling = replace(
            sampling, avoid_repeat_tokens=self._avoid_repeat, preceding_token=fed[-1] if fed else None
        )
        return GenerationRequest(
            initial_state=pre,  # the user turn is in it; the reply continues from its logits
            sampling=sampling,
            max_tokens=self._max_reply_tokens,
            stop=(REPLY_STOP,),
            stop_on_eos=False,  # end-of-text is banned instead (docs/roleplay.md#13-sampling)
            return_state=True,
            use_prefix_cache=False,
            dialect=DIALECT,
            user=account.name,
        )

    async def resay(self, account: Account, name: str | None, sampling: SamplingParams) -> ReplyJob:
        """Admit a new reply to the last user turn, generated from its stored pre-reply state."""
        if not name:
            raise RoleplayFailure(MSG_EMPTY)
        async with self._claimed_chat(account, name) as (guard, chat):
            turns = chat.turns
            if not turns or turns[-1].user is None or turns[-1].bot is None:
                raise RoleplayFailure(MSG_NOT_STARTED)
            engine = self._engine()
            user_node, bot_node = turns[-1].user, turns[-1].bot
            pre = await self._node_state(engine, chat, chat.nodes.index(user_node), account)
            turn_text = user_node.context_text or user_turn(card_text(chat.character), user_node.text)
            request = self._reply_request(engine, pre, turn_text, sampling, account)
            stream = await engine.submit(request)
        bot_id, old_key = bot_node.id, bot_node.state_key

        async def commit(raw: str, final: str, finish: Finish) -> None:
            assert finish.state is not None
            post_key = self._new_key()
            await self._put_state(engine, post_key, finish.state)
            async with self._sessions() as session:
                node = await session.get(ConversationNode, bot_id)
                if node is None:
                    raise GenerationFailed("the chat changed while the reply was generated")
                node.text = final
                node.context_text = _fed_reply(raw, finish)
                node.state_key = post_key
                node.token_count = finish.state.token_count
                await session.commit()
            await self._delete_states(engine, [old_key] if old_key else [])

        return ReplyJob(stream, commit, lambda: self._release_reply(guard))

    async def tamper(self, account: Account, name: str | None, message: str | None) -> None:
        """Replace the last reply by `message` (fed after the pre-reply state, leading space)."""
        if not name or not message:
            raise RoleplayFailure(MSG_EMPTY)
        checked = valid_name(name)
        if checked is None:
            raise RoleplayFailure(MSG_NOT_LOADED)
        async with self._exclusive(account, checked):
            async with self._sessions() as session:
                chat = await self._chat_of(session, account, checked)
            if chat is None:
                raise RoleplayFailure(MSG_NOT_LOADED)
            turns = chat.turns
            if not turns or turns[-1].user is None or turns[-1].bot is None:
                raise RoleplayFailure(MSG_NOT_STARTED)
            engine = self._engine()
            user_node, bot_node = turns[-1].user, turns[-1].bot
            pre = await self._node_state(engine, chat, chat.nodes.index(user_node), account)
            text = said_for_character(message)
            post = await self._feed(engine, pre, text, account)
            post_key, old_key = self._new_key(), bot_node.state_key
            await self._put_state(engine, post_key, post)
            async with self._sessions() as session:
                node = await session.get(ConversationNode, bot_node.id)
                if node is None:
                    raise RoleplayFailure(MSG_NOT_LOADED)
                node.text = message
                node.context_text = text
                node.state_key = post_key
                node.token_count = post.token_count
                await session.commit()
            await self._delete_states(engine, [old_key] if old_key else [])

    async def back(self, account: Account, name: str | None, index: int) -> None:
        """Rewind to row `index`: later rows go; node `index`'s stored states become current."""
        if not name:
            raise RoleplayFailure(MSG_EMPTY)
        checked = valid_name(name)
        if checked is None:
            raise RoleplayFailure(MSG_NO_CHARACTER)
        index = max(index, 0)
        async with self._exclusive(account, checked):
            async with self._sessions() as session:
                character = await CharacterRepo(session).get(account.id, checked)
                if character is None:
                    raise RoleplayFailure(MSG_NO_CHARACTER)
                chat = await self._chat(session, character)
                if chat is None:
                    raise RoleplayFailure(MSG_NOT_LOADED)
                turns = chat.turns
                if index >= len(turns):
                    raise RoleplayFailure(MSG_NO_NODE)
                keep = turns[index].bot or turns[index].user
                assert keep is not None
                cut = chat.nodes.index(keep) + 1
                dropped = chat.nodes[cut:]
                await ConversationRepo(session).delete_nodes(chat.conversation, dropped)
                chat.conversation.current_node_id = keep.id
                await session.commit()
            keys = [n.state_key for n in dropped if n.state_key and n.state_key.startswith(NODE_KEY_PREFIX)]
            await self._delete_states(self._engine_or_none(), keys)

    async def debug(self, account: Account, name: str | None) -> dict[str, Any]:
        """What the current state has consumed: its token count and the text of all of it."""
        if not name:
            raise RoleplayFailure(MSG_EMPTY)
        async with self._sessions() as session:
            chat = await self._chat_of(session, account, name)
        if chat is None:
            raise RoleplayFailure(MSG_NOT_STARTED)
        text = "".join(n.context_text or "" for n in chat.nodes)
        return {"token_count": chat.last.token_count, "token_state": text}

    # -- guests --------------------------------------------------------------------------------------

    async def sweep_guests(self, idle_s: float) -> int:
        """Delete guests idle for `idle_s` seconds with all their data; returns how many went."""
        before = utcnow() - timedelta(seconds=idle_s)
        async with self._sessions() as session:
            guests = await UserRepo(session).idle_guests(before)
            names = [g.name for g in guests]
        removed = 0
        for guest_name in names:
            async with self._sessions() as session:
                users = UserRepo(session)
                guest = await users.get_by_name(guest_name)
                # Seen again since the scan, or a reply is running for it: not idle.
                if guest is None or guest.last_seen_at >= before or self._busy(guest.id):
                    continue
                keys = await delete_user_rows(session, guest)
                await session.commit()
                user_id = guest.id
            for key in [k for k in self._guards if k[0] == user_id]:
                del self._guards[key]
            await self._delete_states(self._engine_or_none(), keys)
            removed += 1
        if removed:
            logger.info("removed %d idle role-play guests", removed)
        return removed

    def _busy(self, user_id: int) -> bool:
        return any(g.lock.locked() for (uid, _), g in self._guards.items() if uid == user_id)


def _fed_reply(raw: str, finish: Finish) -> str:
    # After a stop the context holds the reply and its blank line; at the length cap only the text.
    return raw + REPLY_STOP if finish.reason is FinishReason.STOP else raw


async def sweep_guests_forever(service: RoleplayService, idle_s: float, every_s: float) -> None:
    """The background task of the lifespan: sweep idle guests every `every_s` seconds."""
    while True:
        try:
            await service.sweep_guests(idle_s)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("sweeping idle role-play guests failed")
        await asyncio.sleep(every_s)
