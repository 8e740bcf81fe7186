"""Role-play characters: the cards of each user (list, get, save, delete, export fields).

A card is keyed by its `bot` name within its user, and so are its chat and its persona state.
Saving over a card (or deleting it) drops its chat and, when no other character shares it, its
persona state (docs/roleplay.md#9-characters), so editing a character starts its chat over.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

from rwkv_gateway.domain.roleplay_store import CardFields, CharacterRow, RoleplayUnit
from rwkv_gateway.domain.storage import Storage
from rwkv_gateway.services.roleplay_guards import Guards
from rwkv_gateway.services.roleplay_prompts import CardText, valid_name
from rwkv_gateway.services.roleplay_states import ChatStates, node_keys
from rwkv_gateway.services.roleplay_types import (
    MSG_AVATAR_TOO_LARGE,
    MSG_BAD_NAME,
    MSG_EMPTY,
    MSG_NO_CHARACTER,
    Account,
    RoleplayFailure,
)


def card_fields(character: CharacterRow) -> CardFields:
    return CardFields(
        user=character.user_alias,
        bot=character.name,
        greeting=character.greeting,
        bot_persona=character.persona,
        example_message=character.example_message,
        use_qa=character.use_qa,
        avatar=character.avatar,
    )


def card_text(character: CharacterRow) -> CardText:
    """What the prompt uses of the card (all but the avatar)."""
    card = card_fields(character)
    return CardText(card.user, card.bot, card.greeting, card.bot_persona, card.example_message, card.use_qa)


async def find_character(uow: RoleplayUnit, account: Account, name: str | None) -> CharacterRow | None:
    """The account's character `name`; None for an unknown or invalid name."""
    checked = valid_name(name)
    if checked is None:
        return None
    return await uow.characters.get(account.id, checked)


async def drop_chat(uow: RoleplayUnit, character: CharacterRow) -> list[str]:
    """Delete the character's conversation; returns its node state keys (persona keys excluded)."""
    conversations = uow.conversations
    keys: list[str] = []
    while (conversation := await conversations.get(character.user_id, character.id)) is not None:
        keys += node_keys(await conversations.nodes(conversation.id))
        await conversations.delete(conversation.id)
    return keys


async def _drop_persona(uow: RoleplayUnit, character: CharacterRow) -> list[str]:
    key = character.persona_state_key
    await uow.characters.set_persona_key(character.id, None)
    if key is None or await uow.characters.count_persona_key(key):
        return []
    return [key]


class Characters:
    """The role-play cards of each user (see the module docstring)."""

    def __init__(
        self,
        storage: Storage[RoleplayUnit],
        guards: Guards,
        states: ChatStates,
        *,
        max_avatar_bytes: int,
    ) -> None:
        self._storage = storage
        self._guards = guards
        self._states = states
        self._max_avatar_bytes = max_avatar_bytes

    async def list(self, account: Account) -> list[dict[str, Any]]:
        """`/characters/list` entries, by file name."""
        async with self._storage.transaction() as uow:
            chars = await uow.characters.list(account.id)
        entries = [
            {"char_name": c.name, "file_name": f"{c.name}.json", "avatar": c.avatar or None} for c in chars
        ]
        return sorted(entries, key=lambda e: e["file_name"])

    async def get(self, account: Account, name: str | None) -> dict[str, Any]:
        """The card as `/characters/get` returns it: the reference's save layout and key order, which
        are CardFields' fields in order."""
        async with self._storage.transaction() as uow:
            return asdict(card_fields(await self._known(uow, account, name)))

    async def fields(self, account: Account, name: str | None) -> tuple[CardFields, dict[str, Any]]:
        """The card and its stored extra card fields (for export)."""
        async with self._storage.transaction() as uow:
            character = await self._known(uow, account, name)
            extra = json.loads(character.card_extra) if character.card_extra else {}
            return card_fields(character), extra if isinstance(extra, dict) else {}

    @staticmethod
    async def _known(uow: RoleplayUnit, account: Account, name: str | None) -> CharacterRow:
        if not name:
            raise RoleplayFailure(MSG_EMPTY)
        character = await find_character(uow, account, name)
        if character is None:
            raise RoleplayFailure(MSG_NO_CHARACTER)
        return character

    def check(self, card: CardFields, *, require_greeting: bool = True) -> CardFields:
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

    async def save(
        self,
        account: Account,
        card: CardFields,
        *,
        extra: dict[str, Any] | None = None,
        require_greeting: bool = True,
    ) -> None:
        """Create or overwrite a card; its chat and cached persona state are dropped (as the reference)."""
        card = self.check(card, require_greeting=require_greeting)
        async with self._guards.exclusive(account.id, card.bot):
            async with self._storage.transaction() as uow:
                chars = uow.characters
                character = await chars.get(account.id, card.bot)
                keys: list[str] = []
                if character is None:
                    character = await chars.add(account.id, card)
                else:
                    keys = await drop_chat(uow, character)
                    await chars.update(character.id, card)
                    keys += await _drop_persona(uow, character)
                if extra is not None:
                    await chars.set_card_extra(
                        character.id, json.dumps(extra, ensure_ascii=False) if extra else None
                    )
                await uow.commit()
            await self._states.delete(keys)

    async def delete(self, account: Account, name: str | None) -> None:
        """Remove a card and its chat; always succeeds (unknown names included)."""
        if not name:
            raise RoleplayFailure(MSG_EMPTY)
        checked = valid_name(name)
        if checked is None:
            return
        async with self._guards.exclusive(account.id, checked):
            async with self._storage.transaction() as uow:
                character = await uow.characters.get(account.id, checked)
                if character is None:
                    return
                keys = await drop_chat(uow, character)
                keys += await _drop_persona(uow, character)
                await uow.characters.delete(character.id)
                await uow.commit()
            await self._states.delete(keys)
