"""Role-play chats: load, reply, resay, tamper, back, reset, debug; and the service the routes use.

A chat is a linear path of dialogue nodes: a system node (the persona block, whose state is the
character's cached persona state), the greeting (a bot node sharing that state), then per turn a user
node whose state is the pre-reply state (just after `"{user}: {prompt}\\n\\n{bot}:"`) and a bot node
whose state is the state after the reply and its `"\\n\\n"`. Every node state is a snapshot persisted
in the engine's state store (`roleplay_states.py`), so a reply prefills only the new user turn, resay
restarts from the pre-reply snapshot, tamper feeds only the replacement text, back restores node i's
snapshot and reset reuses the persona state, none of them re-prefilling history.

Consistency rules: one operation at a time per (user, character) (`roleplay_guards.py`), short DB
sessions never held across a stream, snapshots written before the transaction that references them,
and a reply whose client disconnects is dropped: nothing is persisted, so the chat stays exactly as
before the request. `RoleplayService` also carries the characters (`roleplay_characters.py`) and the
guest sweep (`roleplay_guests.py`), which share its guards and states.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Any

from rwkv_gateway.domain.engine import Engine
from rwkv_gateway.domain.roleplay_store import CharacterRow, ConversationRow, NewNode, NodeRow, RoleplayUnit
from rwkv_gateway.domain.storage import Storage
from rwkv_gateway.domain.types import FinishReason, GenerationRequest, SamplingParams, Snapshot
from rwkv_gateway.errors import GenerationFailed
from rwkv_gateway.services.roleplay_characters import Characters, card_text, drop_chat, find_character
from rwkv_gateway.services.roleplay_guards import Guard, Guards
from rwkv_gateway.services.roleplay_guests import Guests
from rwkv_gateway.services.roleplay_prompts import (
    AVOID_REPEAT,
    REPLY_STOP,
    persona_block,
    said_for_character,
    user_turn,
    valid_name,
)
from rwkv_gateway.services.roleplay_states import DIALECT, ChatStates, new_node_key, node_keys
from rwkv_gateway.services.roleplay_types import (
    MSG_EMPTY,
    MSG_NO_CHARACTER,
    MSG_NO_NODE,
    MSG_NOT_LOADED,
    MSG_NOT_STARTED,
    Account,
    NewReply,
    NewTurn,
    Reply,
    ReplyJob,
    RoleplayFailure,
    Row,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Turn:
    """One history row and the nodes behind it."""

    user: NodeRow | None
    bot: NodeRow | None

    def row(self) -> Row:
        return [None if self.user is None else self.user.text, None if self.bot is None else self.bot.text]


@dataclass(slots=True)
class _Chat:
    character: CharacterRow
    conversation: ConversationRow
    nodes: list[NodeRow]

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
    def last(self) -> NodeRow:
        return self.nodes[-1]


class RoleplayService:
    """The chats of role-play users (see the module docstring), their characters and the guest sweep."""

    def __init__(
        self,
        storage: Storage[RoleplayUnit],
        engine: Callable[[], Engine],
        *,
        max_reply_tokens: int = 512,
        max_avatar_bytes: int = 2**20,
    ) -> None:
        self._storage = storage
        self._engine = engine
        self._max_reply_tokens = max_reply_tokens
        self._guards = Guards()
        self._states = ChatStates(engine)
        self.characters = Characters(storage, self._guards, self._states, max_avatar_bytes=max_avatar_bytes)
        self.guests = Guests(storage, self._guards, self._states)
        #: Token ids of AVOID_REPEAT in the served vocabulary (found on first use).
        self._avoid_repeat: frozenset[int] | None = None

    @contextlib.asynccontextmanager
    async def _claimed_chat(self, account: Account, name: str) -> AsyncIterator[tuple[Guard, _Chat]]:
        """Claim (user, character) for a reply and load its chat. If the body fails (before the reply
        is admitted) the claim is released again; otherwise the reply job releases it when it ends."""
        checked = valid_name(name)
        if checked is None:
            raise RoleplayFailure(MSG_NOT_LOADED)
        guard = await self._guards.claim_for_reply(account.id, checked)
        try:
            async with self._storage.transaction() as uow:
                chat = await self._chat_of(uow, account, checked)
            if chat is None:
                raise RoleplayFailure(MSG_NOT_LOADED)
            yield guard, chat
        except BaseException:
            guard.release_reply()
            raise

    async def _node_state(self, engine: Engine, chat: _Chat, index: int, account: Account) -> Snapshot:
        return await self._states.of_node(engine, chat.nodes, index, card_text(chat.character), account)

    @staticmethod
    async def _chat(uow: RoleplayUnit, character: CharacterRow) -> _Chat | None:
        conversations = uow.conversations
        conversation = await conversations.get(character.user_id, character.id)
        if conversation is None:
            return None
        nodes = list(await conversations.nodes(conversation.id))
        if not nodes:
            return None
        return _Chat(character, conversation, nodes)

    async def _chat_of(self, uow: RoleplayUnit, account: Account, name: str | None) -> _Chat | None:
        character = await find_character(uow, account, name)
        return None if character is None else await self._chat(uow, character)

    async def load(self, account: Account, name: str | None) -> list[Row]:
        """The chat's rows, creating the chat (greeting only) when there is none. Idempotent."""
        if not name:
            raise RoleplayFailure(MSG_EMPTY)
        async with self._storage.transaction() as uow:
            character = await find_character(uow, account, name)
            if character is None:
                raise RoleplayFailure(MSG_NO_CHARACTER)
            chat = await self._chat(uow, character)
            if chat is not None:
                return [t.row() for t in chat.turns]
        async with self._guards.exclusive(account.id, character.name):
            return await self._create_chat(account, character.name)

    async def reset(self, account: Account, name: str | None) -> list[Row]:
        """Start the chat over from the cached persona state."""
        if not name:
            raise RoleplayFailure(MSG_EMPTY)
        checked = valid_name(name)
        if checked is None:
            raise RoleplayFailure(MSG_NO_CHARACTER)
        async with self._guards.exclusive(account.id, checked):
            async with self._storage.transaction() as uow:
                character = await uow.characters.get(account.id, checked)
                if character is None:
                    raise RoleplayFailure(MSG_NO_CHARACTER)
                keys = await drop_chat(uow, character)
                await uow.commit()
            rows = await self._create_chat(account, checked)
            await self._states.delete(keys)
            return rows

    async def _create_chat(self, account: Account, name: str) -> list[Row]:
        """Create the chat of `name` unless it exists (caller holds the guard); returns its rows."""
        engine = self._engine()
        async with self._storage.transaction() as uow:
            character = await uow.characters.get(account.id, name)
            if character is None:
                raise RoleplayFailure(MSG_NO_CHARACTER)
            chat = await self._chat(uow, character)
            if chat is not None:
                return [t.row() for t in chat.turns]
            card = card_text(character)
        key, snap = await self._states.persona(engine, card, account)
        async with self._storage.transaction() as uow:
            character = await uow.characters.get(account.id, name)
            if character is None:
                raise RoleplayFailure(MSG_NO_CHARACTER)
            await uow.characters.set_persona_key(character.id, key)
            conversations = uow.conversations
            conversation = await conversations.add(account.id, character.id)
            system = await conversations.add_node(
                NewNode(
                    conversation_id=conversation.id,
                    parent_id=None,
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
                    NewNode(
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
            await conversations.set_current(conversation.id, last.id)
            await uow.commit()
        return [[None, card.greeting]] if card.greeting else []

    async def reply(
        self, account: Account, name: str | None, prompt: str | None, sampling: SamplingParams
    ) -> ReplyJob:
        """Admit a reply to `prompt`: the user turn is prefilled from the last node's state before this
        returns; the job generates the reply, and `save_reply` stores the turn once the reply ended."""
        name = (name or "").strip()
        prompt = (prompt or "").strip()
        if not name or not prompt:
            raise RoleplayFailure(MSG_EMPTY)
        async with self._claimed_chat(account, name) as (guard, chat):
            engine = self._engine()
            card = card_text(chat.character)
            current = await self._node_state(engine, chat, len(chat.nodes) - 1, account)
            turn_text = user_turn(card, prompt)
            pre = await self._states.feed(engine, current, turn_text, account)
            request = self._reply_request(engine, pre, turn_text, sampling, account)
            stream = await engine.submit(request)
        turn = NewTurn(chat.conversation.id, chat.last.id, chat.last.position, prompt, turn_text, pre)
        return ReplyJob(engine, stream, turn, guard.release_reply)

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
        return ReplyJob(engine, stream, NewReply(bot_node.id, bot_node.state_key), guard.release_reply)

    async def save_reply(self, job: ReplyJob) -> None:
        """Store the reply of a job whose `texts()` reached the reply's end (the route calls this before
        it sends the final text); the job still holds the chat's guard. Snapshots are written before the
        transaction that references them."""
        reply = job.reply
        if reply is None or reply.finish.state is None:
            raise GenerationFailed("the reply did not finish")
        if isinstance(job.turn, NewReply):
            await self._save_resaid(job.engine, job.turn, reply, reply.finish.state)
        else:
            await self._save_turn(job.engine, job.turn, reply, reply.finish.state)

    async def _save_turn(self, engine: Engine, turn: NewTurn, reply: Reply, post: Snapshot) -> None:
        """A reply's turn: a user node (the pre-reply state) and a bot node (the state after the reply)."""
        pre_key, post_key = new_node_key(), new_node_key()
        await self._states.put(engine, pre_key, turn.pre)
        await self._states.put(engine, post_key, post)
        async with self._storage.transaction() as uow:
            conversations = uow.conversations
            conversation = await conversations.get_by_id(turn.conversation_id, lock=True)
            if conversation is None or conversation.current_node_id != turn.after_id:
                raise GenerationFailed("the chat changed while the reply was generated")
            user_node = await conversations.add_node(
                NewNode(
                    conversation_id=turn.conversation_id,
                    parent_id=turn.after_id,
                    position=turn.after_position + 1,
                    role="user",
                    text=turn.prompt,
                    context_text=turn.turn_text,
                    state_key=pre_key,
                    token_count=turn.pre.token_count,
                )
            )
            bot_node = await conversations.add_node(
                NewNode(
                    conversation_id=turn.conversation_id,
                    parent_id=user_node.id,
                    position=turn.after_position + 2,
                    role="bot",
                    text=reply.final,
                    context_text=_fed_reply(reply),
                    state_key=post_key,
                    token_count=post.token_count,
                )
            )
            await conversations.set_current(turn.conversation_id, bot_node.id)
            await uow.commit()

    async def _save_resaid(self, engine: Engine, turn: NewReply, reply: Reply, post: Snapshot) -> None:
        """A resay's reply: the last bot node gets it and the state after it; its old state goes."""
        post_key = new_node_key()
        await self._states.put(engine, post_key, post)
        async with self._storage.transaction() as uow:
            rewritten = await uow.conversations.rewrite_node(
                turn.bot_id,
                text=reply.final,
                context_text=_fed_reply(reply),
                state_key=post_key,
                token_count=post.token_count,
            )
            if not rewritten:
                raise GenerationFailed("the chat changed while the reply was generated")
            await uow.commit()
        await self._states.delete([turn.old_key] if turn.old_key else [], engine)

    async def tamper(self, account: Account, name: str | None, message: str | None) -> None:
        """Replace the last reply by `message` (fed after the pre-reply state, leading space)."""
        if not name or not message:
            raise RoleplayFailure(MSG_EMPTY)
        checked = valid_name(name)
        if checked is None:
            raise RoleplayFailure(MSG_NOT_LOADED)
        async with self._guards.exclusive(account.id, checked):
            async with self._storage.transaction() as uow:
                chat = await self._chat_of(uow, account, checked)
            if chat is None:
                raise RoleplayFailure(MSG_NOT_LOADED)
            turns = chat.turns
            if not turns or turns[-1].user is None or turns[-1].bot is None:
                raise RoleplayFailure(MSG_NOT_STARTED)
            engine = self._engine()
            user_node, bot_node = turns[-1].user, turns[-1].bot
            pre = await self._node_state(engine, chat, chat.nodes.index(user_node), account)
            text = said_for_character(message)
            post = await self._states.feed(engine, pre, text, account)
            post_key, old_key = new_node_key(), bot_node.state_key
            await self._states.put(engine, post_key, post)
            async with self._storage.transaction() as uow:
                rewritten = await uow.conversations.rewrite_node(
                    bot_node.id,
                    text=message,
                    context_text=text,
                    state_key=post_key,
                    token_count=post.token_count,
                )
                if not rewritten:
                    raise RoleplayFailure(MSG_NOT_LOADED)
                await uow.commit()
            await self._states.delete([old_key] if old_key else [], engine)

    async def back(self, account: Account, name: str | None, index: int) -> None:
        """Rewind to row `index`: later rows go; node `index`'s stored states become current."""
        if not name:
            raise RoleplayFailure(MSG_EMPTY)
        checked = valid_name(name)
        if checked is None:
            raise RoleplayFailure(MSG_NO_CHARACTER)
        index = max(index, 0)
        async with self._guards.exclusive(account.id, checked):
            async with self._storage.transaction() as uow:
                character = await uow.characters.get(account.id, checked)
                if character is None:
                    raise RoleplayFailure(MSG_NO_CHARACTER)
                chat = await self._chat(uow, character)
                if chat is None:
                    raise RoleplayFailure(MSG_NOT_LOADED)
                turns = chat.turns
                if index >= len(turns):
                    raise RoleplayFailure(MSG_NO_NODE)
                keep = turns[index].bot or turns[index].user
                assert keep is not None
                cut = chat.nodes.index(keep) + 1
                dropped = chat.nodes[cut:]
                await uow.conversations.delete_nodes(chat.conversation.id, [n.id for n in dropped])
                await uow.conversations.set_current(chat.conversation.id, keep.id)
                await uow.commit()
            keys = node_keys(dropped)
            await self._states.delete(keys)

    async def debug(self, account: Account, name: str | None) -> dict[str, Any]:
        """What the current state has consumed: its token count and the text of all of it."""
        if not name:
            raise RoleplayFailure(MSG_EMPTY)
        async with self._storage.transaction() as uow:
            chat = await self._chat_of(uow, account, name)
        if chat is None:
            raise RoleplayFailure(MSG_NOT_STARTED)
        text = "".join(n.context_text or "" for n in chat.nodes)
        return {"token_count": chat.last.token_count, "token_state": text}


def _fed_reply(reply: Reply) -> str:
    # After a stop the context holds the reply and its blank line; at the length cap only the text.
    return reply.raw + REPLY_STOP if reply.finish.reason is FinishReason.STOP else reply.raw
