"""Guest expiry: guests idle past the TTL go with everything they own (docs/roleplay.md#8-guests).

A guest seen again since the scan, or with an operation running on one of its chats, is kept; a
deleted guest's guards and stored states go too. The lifespan runs `sweep_guests_forever`.
`delete_user_rows` is the one way a role-play account's rows go (the `users del` command uses it too).
"""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

from rwkv_gateway.domain.roleplay_store import RoleplayUnit
from rwkv_gateway.domain.storage import Storage, utcnow
from rwkv_gateway.services.roleplay_guards import Guards
from rwkv_gateway.services.roleplay_prompts import NODE_KEY_PREFIX
from rwkv_gateway.services.roleplay_states import ChatStates

logger = logging.getLogger(__name__)


async def delete_user_rows(uow: RoleplayUnit, user_id: int) -> list[str]:
    """Delete the user (tokens, characters, conversations and nodes go with it); returns the state
    keys nobody else uses any more."""
    keys = {k for k in await uow.conversations.state_keys_of_user(user_id) if k.startswith(NODE_KEY_PREFIX)}
    personas = {c.persona_state_key for c in await uow.characters.list(user_id) if c.persona_state_key}
    await uow.users.delete(user_id)
    for key in personas:
        if not await uow.characters.count_persona_key(key):
            keys.add(key)
    return sorted(keys)


class Guests:
    """The idle-guest sweep (see the module docstring)."""

    def __init__(self, storage: Storage[RoleplayUnit], guards: Guards, states: ChatStates) -> None:
        self._storage = storage
        self._guards = guards
        self._states = states

    async def sweep(self, idle_s: float) -> int:
        """Delete guests idle for `idle_s` seconds with all their data; returns how many went."""
        before = utcnow() - timedelta(seconds=idle_s)
        async with self._storage.transaction() as uow:
            guests = await uow.users.idle_guests(before)
            names = [g.name for g in guests]
        removed = 0
        for guest_name in names:
            async with self._storage.transaction() as uow:
                guest = await uow.users.get_by_name(guest_name)
                # Seen again since the scan, or a reply is running for it: not idle.
                if guest is None or guest.last_seen_at >= before or self._guards.busy(guest.id):
                    continue
                user_id = guest.id
                keys = await delete_user_rows(uow, user_id)
                await uow.commit()
            self._guards.forget(user_id)
            await self._states.delete(keys)
            removed += 1
        if removed:
            logger.info("removed %d idle role-play guests", removed)
        return removed


async def sweep_guests_forever(guests: Guests, idle_s: float, every_s: float) -> None:
    """The background task of the lifespan: sweep idle guests every `every_s` seconds."""
    while True:
        try:
            await guests.sweep(idle_s)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("sweeping idle role-play guests failed")
        await asyncio.sleep(every_s)
