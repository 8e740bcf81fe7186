"""Accounts of the role-play API: users and guests, passwords, login tokens and default characters.

Passwords are Argon2id hashes (argon2-cffi). Login tokens are random (32 lowercase hex characters,
like the reference's UUID without dashes), stored only as SHA-256 digests, one per user: a new login
replaces the previous token. A guest is `tmp-<32 hex>` and its token is its own name, as in the
reference; the token prefix chooses which kind of account a request speaks for. Default characters
(a folder of reference-format character JSON files) are given to a user once, at the first login,
and never overwrite a character the user already has. Every method runs in its own short
transaction, a unit of work of the `Storage` it is given (`domain/user_store.py`); failures a client
sees are `RoleplayFailure`s carrying the reference's exact message.
"""

from __future__ import annotations

import asyncio
import builtins
import hashlib
import hmac
import json
import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from rwkv_gateway.domain.roleplay_store import CardFields
from rwkv_gateway.domain.storage import Storage, utcnow
from rwkv_gateway.domain.user_store import UserUnit
from rwkv_gateway.errors import GatewayError, InvalidParameter, NotFound
from rwkv_gateway.services.roleplay_guests import delete_user_rows
from rwkv_gateway.services.roleplay_prompts import valid_name
from rwkv_gateway.services.roleplay_types import (
    MSG_BAD_PASSWORD,
    MSG_EMPTY,
    MSG_KEY_MISSING,
    MSG_LOGIN_FAILED,
    MSG_NO_USER,
    MSG_STALE_TOKEN,
    Account,
    RoleplayFailure,
)

logger = logging.getLogger(__name__)

GUEST_PREFIX = "tmp-"
#: The bundled default characters (one example of this project's own).
BUNDLED_DEFAULTS = Path(__file__).with_name("roleplay_defaults")
#: last_seen_at is written at most this often per user (it only drives guest expiry).
_SEEN_RESOLUTION = timedelta(seconds=60)


@dataclass(frozen=True, slots=True)
class UserInfo:
    name: str
    created_at: datetime
    last_seen_at: datetime
    characters: int


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def _optional_text(value: Any) -> str:
    # The UI serialises JS null/undefined as these strings (docs/roleplay.md#9-characters).
    if value is None or value in ("null", "undefined") or not isinstance(value, str):
        return ""
    return value


def card_from_json(data: Any) -> CardFields:
    """A reference character file's object; InvalidParameter when a required field is missing."""
    if not isinstance(data, dict):
        raise InvalidParameter("a character file must hold a JSON object")
    fields = {}
    for key in ("user", "bot", "greeting", "bot_persona"):
        value = data.get(key)
        if not isinstance(value, str) or not value:
            raise InvalidParameter(f"the character has no {key}")
        fields[key] = value
    bot = valid_name(fields["bot"])
    if bot is None:
        raise InvalidParameter(f"invalid character name {fields['bot']!r}")
    avatar = _optional_text(data.get("avatar")) or None
    return CardFields(
        user=fields["user"],
        bot=bot,
        greeting=fields["greeting"],
        bot_persona=fields["bot_persona"],
        example_message=_optional_text(data.get("example_message")),
        use_qa=bool(data.get("use_qa")),
        avatar=avatar,
    )


def read_card_files(directory: Path) -> list[CardFields]:
    """Every readable character JSON file of `directory`, by file name; unreadable ones are skipped."""
    cards: list[CardFields] = []
    if not directory.is_dir():
        return cards
    for path in sorted(directory.glob("*.json")):
        try:
            cards.append(card_from_json(json.loads(path.read_text(encoding="utf-8"))))
        except (OSError, ValueError, GatewayError) as exc:
            logger.warning("skipping character file %s: %s", path, exc)
    return cards


class UserService:
    """Accounts, guests and tokens (role-play API and the `users` CLI)."""

    def __init__(self, storage: Storage[UserUnit], *, defaults_dir: Path | None = None) -> None:
        self._storage = storage
        self._defaults_dir = defaults_dir if defaults_dir is not None else BUNDLED_DEFAULTS
        self._hasher = PasswordHasher()

    # -- operator side (CLI) -------------------------------------------------------------------------

    async def add(self, name: str, password: str) -> None:
        checked = valid_name(name)
        if checked is None or checked.startswith(GUEST_PREFIX):
            raise InvalidParameter(f"invalid user name {name!r}")
        if not password:
            raise InvalidParameter("the password is empty")
        hashed = await asyncio.to_thread(self._hasher.hash, password)
        async with self._storage.transaction() as uow:
            if await uow.users.get_by_name(checked) is not None:
                raise InvalidParameter(f"user {checked!r} already exists")
            await uow.users.add(checked, hashed, is_guest=False)
            await uow.commit()

    async def set_password(self, name: str, password: str) -> None:
        hashed = await asyncio.to_thread(self._hasher.hash, password)
        async with self._storage.transaction() as uow:
            user = await uow.users.get_by_name(name)
            if user is None or user.is_guest:
                raise NotFound(f"no user {name!r}")
            await uow.users.set_password(user.id, hashed)
            await uow.commit()

    async def delete(self, name: str) -> list[str]:
        """Delete a user (or guest) with everything they own; returns the state-store keys that only
        they used, for the caller to delete from the state store."""
        async with self._storage.transaction() as uow:
            user = await uow.users.get_by_name(name)
            if user is None:
                raise NotFound(f"no user {name!r}")
            keys = await delete_user_rows(uow, user.id)
            await uow.commit()
            return keys

    async def list(self, *, guests: bool = False) -> builtins.list[UserInfo]:
        async with self._storage.transaction() as uow:
            users = await uow.users.list(guests=guests)
            chars = uow.characters
            return [
                UserInfo(u.name, u.created_at, u.last_seen_at, len(await chars.list(u.id))) for u in users
            ]

    async def import_legacy(self, root: Path) -> tuple[builtins.list[str], int]:
        """Import a reference deployment: `user/<name>` password files and `chars/*.json` as each
        imported user's characters (`chars/<name>/*.json` when present). Existing users are left
        alone. Returns (imported user names, characters imported)."""
        user_dir = root / "user"
        if not user_dir.is_dir():
            raise NotFound(f"{user_dir} is not a directory")
        shared = read_card_files(root / "chars")
        imported: builtins.list[str] = []
        n_chars = 0
        for path in sorted(user_dir.iterdir()):
            if not path.is_file():
                continue
            name = valid_name(path.name)
            if name is None or name.startswith(GUEST_PREFIX):
                logger.warning("skipping legacy account %r: not a valid user name", path.name)
                continue
            password = path.read_text(encoding="utf-8")
            # The reference compares the whole file; a trailing newline is an editor's, not a password's.
            password = password.removesuffix("\n").removesuffix("\r")
            if not password:
                logger.warning("skipping legacy account %r: empty password", name)
                continue
            hashed = await asyncio.to_thread(self._hasher.hash, password)
            own = read_card_files(root / "chars" / path.name)
            async with self._storage.transaction() as uow:
                if await uow.users.get_by_name(name) is not None:
                    logger.warning("skipping legacy account %r: the user exists", name)
                    continue
                user = await uow.users.add(name, hashed, is_guest=False)
                seen: set[str] = set()
                for card in [*own, *shared]:
                    if card.bot in seen:
                        continue
                    seen.add(card.bot)
                    await uow.characters.add(user.id, card)
                    n_chars += 1
                await uow.commit()
            imported.append(name)
        return imported, n_chars

    # -- the role-play routes ------------------------------------------------------------------------

    def _default_cards(self) -> Sequence[CardFields]:
        return read_card_files(self._defaults_dir)

    async def _provision(self, uow: UserUnit, user_id: int) -> None:
        """Give the default characters the user does not have yet (never overwriting an edit)."""
        cards = await asyncio.to_thread(self._default_cards)
        chars = uow.characters
        for card in cards:
            if await chars.get(user_id, card.bot) is None:
                await chars.add(user_id, card)

    async def login(self, user_name: str | None, password: str | None) -> tuple[str, str]:
        """(user name, new token) for a correct password; the user's previous token stops working."""
        if not user_name or not password:
            raise RoleplayFailure(MSG_KEY_MISSING)
        name = valid_name(user_name)
        if name is None:
            raise RoleplayFailure(MSG_NO_USER)
        async with self._storage.transaction() as uow:
            user = await uow.users.get_by_name(name)
            stored = None if user is None or user.is_guest else user.password_hash
        if stored is None:
            raise RoleplayFailure(MSG_NO_USER)
        try:
            await asyncio.to_thread(self._hasher.verify, stored, password)
        except (VerificationError, InvalidHashError):
            raise RoleplayFailure(MSG_BAD_PASSWORD) from None
        token = secrets.token_hex(16)
        try:
            async with self._storage.transaction() as uow:
                users = uow.users
                user = await users.get_by_name(name)
                if user is None:
                    raise RoleplayFailure(MSG_NO_USER)
                await users.replace_token(user.id, _digest(token))
                if not user.defaults_given:
                    await self._provision(uow, user.id)
                    await users.set_defaults_given(user.id)
                await users.set_last_seen(user.id, utcnow())
                await uow.commit()
        except RoleplayFailure:
            raise
        except Exception:
            logger.exception("login of %s failed", name)
            raise RoleplayFailure(MSG_LOGIN_FAILED) from None
        return name, token

    async def login_guest(self) -> tuple[str, str]:
        """A new guest account with the default characters; its token is its name."""
        name = GUEST_PREFIX + secrets.token_hex(16)
        try:
            async with self._storage.transaction() as uow:
                users = uow.users
                user = await users.add(name, None, is_guest=True)
                await users.replace_token(user.id, _digest(name))
                await self._provision(uow, user.id)
                await users.set_defaults_given(user.id)
                await uow.commit()
        except Exception:
            logger.exception("creating a guest failed")
            raise RoleplayFailure(MSG_LOGIN_FAILED) from None
        return name, name

    async def authenticate(self, user_name: str | None, token: str | None) -> Account:
        """The token check, in the reference's order (docs/roleplay.md#6-token-check)."""
        if not user_name or not token:
            raise RoleplayFailure(MSG_EMPTY)
        name = valid_name(user_name)
        if name is None:
            raise RoleplayFailure(MSG_NO_USER)
        guest = token.startswith(GUEST_PREFIX)
        async with self._storage.transaction() as uow:
            users = uow.users
            user = await users.get_by_name(name)
            stored = None if user is None or user.is_guest != guest else await users.token_hash(user.id)
            if user is None or stored is None:
                raise RoleplayFailure(MSG_NO_USER)
            if not hmac.compare_digest(stored, _digest(token)):
                raise RoleplayFailure(MSG_STALE_TOKEN, 403)
            now = utcnow()
            if now - _aware(user.last_seen_at) >= _SEEN_RESOLUTION:
                await users.set_last_seen(user.id, now)
                await uow.commit()
            return Account(user.id, user.name, user.is_guest)


def _aware(value: datetime) -> datetime:
    # SQLite hands back naive datetimes for what was written as UTC.
    return value if value.tzinfo is not None else value.replace(tzinfo=utcnow().tzinfo)
