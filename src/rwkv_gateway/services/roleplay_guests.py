"""Guest expiry: guests idle past the TTL go with everything they own (docs/roleplay.md#8-guests).

A guest seen again since the scan, or with an operation running on one of its chats, is kept; a
deleted guest's guards and stored states go too. The lifespan runs `sweep_guests_forever`.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from rwkv_gateway.db.repo import UserRepo
from rwkv_gateway.services.roleplay_guards import Guards
from rwkv_gateway.services.roleplay_states import ChatStates
from rwkv_gateway.services.users import delete_user_rows

logger = logging.getLogger(__name__)


class Guests:
    """The idle-guest sweep (see the module docstring)."""

    def __init__(
        self, sessions: async_sessionmaker[AsyncSession], guards: Guards, states: ChatStates
    ) -> None:
        self._sessions = sessions
        self._guards = guards
        self._states = states

    async def sweep(self, idle_s: float) -> int:
        """Delete guests idle for `idle_s` seconds with all their data; returns how many went."""
        before = datetime.now(UTC) - timedelta(seconds=idle_s)
        async with self._sessions() as session:
            guests = await UserRepo(session).idle_guests(before)
            names = [g.name for g in guests]
        removed = 0
        for guest_name in names:
            async with self._sessions() as session:
                users = UserRepo(session)
                guest = await users.get_by_name(guest_name)
                # Seen again since the scan, or a reply is running for it: not idle.
                if guest is None or guest.last_seen_at >= before or self._guards.busy(guest.id):
                    continue
                keys = await delete_user_rows(session, guest)
                await session.commit()
                user_id = guest.id
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
