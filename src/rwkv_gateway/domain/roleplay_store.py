"""The role-play services' storage port: characters, conversations and their dialogue nodes, guests.

`RoleplayUnit` is what one transaction of the role-play services reaches: the character,
conversation and guest repositories below, which `db/repo.py` implements (its ORM rows have these attributes)
and its unit of work carries. Rows are read through the protocols here and changed only through
repository methods, by id; repositories only flush, the service commits (docs/architecture.md#layers).
`CardFields` is the character card as the role-play API and its character files spell it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from rwkv_gateway.domain.storage import UnitOfWork


@dataclass(frozen=True, slots=True)
class CardFields:
    """A character as the reference stores it (`chars/*.json`)."""

    user: str
    bot: str
    greeting: str
    bot_persona: str
    example_message: str = ""
    use_qa: bool = False
    avatar: str | None = None


@dataclass(frozen=True, slots=True)
class NewNode:
    """A dialogue node to add: its place in the conversation, its text and the state after it."""

    conversation_id: int
    parent_id: int | None
    position: int
    role: str
    text: str
    #: What the model was fed for this node (rebuilds the state when its snapshot is gone).
    context_text: str
    state_key: str | None
    token_count: int


class CharacterRow(Protocol):
    """A stored character: the card (`name` is its `bot`), its persona state key and extra card fields."""

    @property
    def id(self) -> int: ...
    @property
    def user_id(self) -> int: ...
    @property
    def name(self) -> str: ...
    @property
    def user_alias(self) -> str: ...
    @property
    def greeting(self) -> str: ...
    @property
    def persona(self) -> str: ...
    @property
    def example_message(self) -> str: ...
    @property
    def use_qa(self) -> bool: ...
    @property
    def avatar(self) -> str | None: ...
    @property
    def persona_state_key(self) -> str | None: ...
    @property
    def card_extra(self) -> str | None: ...


class ConversationRow(Protocol):
    """The chat of one user with one character; `current_node_id` is its last node."""

    @property
    def id(self) -> int: ...
    @property
    def current_node_id(self) -> int | None: ...


class NodeRow(Protocol):
    """One dialogue node: a system (persona), user or bot turn and the state-store key of the state
    after it."""

    @property
    def id(self) -> int: ...
    @property
    def position(self) -> int: ...
    @property
    def role(self) -> str: ...
    @property
    def text(self) -> str: ...
    @property
    def context_text(self) -> str | None: ...
    @property
    def state_key(self) -> str | None: ...
    @property
    def token_count(self) -> int: ...


class UserRow(Protocol):
    """A role-play account as the guest sweep sees it."""

    @property
    def id(self) -> int: ...
    @property
    def name(self) -> str: ...
    @property
    def last_seen_at(self) -> datetime: ...


class GuestRepository(Protocol):
    """The accounts the guest sweep finds and deletes (a user's rows go with it)."""

    async def idle_guests(self, before: datetime) -> Sequence[UserRow]:
        """Guests last seen before `before`, oldest account first."""
        ...

    async def get_by_name(self, name: str) -> UserRow | None: ...

    async def delete(self, user_id: int) -> None:
        """Delete the user; tokens, characters, conversations and nodes go with it."""
        ...


class CharacterRepository(Protocol):
    """A user's characters, keyed by (user, name)."""

    async def list(self, user_id: int) -> Sequence[CharacterRow]: ...

    async def get(self, user_id: int, name: str) -> CharacterRow | None: ...

    async def add(self, user_id: int, card: CardFields) -> CharacterRow: ...

    async def update(self, character_id: int, card: CardFields) -> None:
        """Overwrite the card's fields (the name stays)."""
        ...

    async def set_card_extra(self, character_id: int, extra: str | None) -> None: ...

    async def set_persona_key(self, character_id: int, key: str | None) -> None: ...

    async def delete(self, character_id: int) -> None: ...

    async def count_persona_key(self, key: str) -> int:
        """How many characters (of any user) share this cached persona state."""
        ...


class ConversationRepository(Protocol):
    """Conversations (one per user and character) and their nodes, read as the path to the current node."""

    async def get(self, user_id: int, character_id: int) -> ConversationRow | None: ...

    async def get_by_id(self, conversation_id: int, *, lock: bool = False) -> ConversationRow | None:
        """The conversation; `lock` keeps other transactions from changing it until this one ends
        (a turn checks that the chat did not move on meanwhile, on another replica too)."""
        ...

    async def add(self, user_id: int, character_id: int) -> ConversationRow: ...

    async def set_current(self, conversation_id: int, node_id: int) -> None:
        """Make `node_id` the conversation's last node (and mark the conversation updated)."""
        ...

    async def nodes(self, conversation_id: int) -> Sequence[NodeRow]:
        """Every node of the conversation in path order."""
        ...

    async def add_node(self, node: NewNode) -> NodeRow: ...

    async def rewrite_node(
        self, node_id: int, *, text: str, context_text: str, state_key: str, token_count: int
    ) -> bool:
        """Give a node new text and the state after it; False when the node is gone."""
        ...

    async def delete_nodes(self, conversation_id: int, node_ids: Iterable[int]) -> None: ...

    async def delete(self, conversation_id: int) -> None:
        """Delete the conversation with its nodes."""
        ...

    async def state_keys_of_user(self, user_id: int) -> list[str]:
        """State-store keys of every node of the user's conversations."""
        ...


class RoleplayUnit(UnitOfWork, Protocol):
    """What one transaction of the role-play services reaches."""

    @property
    def characters(self) -> CharacterRepository: ...
    @property
    def conversations(self) -> ConversationRepository: ...
    @property
    def users(self) -> GuestRepository: ...
