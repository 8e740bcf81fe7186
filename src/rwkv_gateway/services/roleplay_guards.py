"""One role-play operation at a time per (user, character): the guards and the reply claim.

A short operation (save, delete, load, reset, tamper, back) holds the guard's lock for its duration;
a reply or resay claims it for as long as its generation runs and marks it `replying`, so anything
else on that chat answers `角色正在回复中，请稍后再试` at once instead of waiting
(docs/roleplay.md#14-conversation-state). The guest sweeper asks whether a user has a claim running.
"""

# ruff: noqa: RUF002  (the reference's messages use full-width punctuation)

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from rwkv_gateway.services.roleplay_types import MSG_BUSY, RoleplayFailure


@dataclass(slots=True)
class Guard:
    """Serialises the operations on one (user, character); `replying` marks a reply holding it."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    replying: bool = False

    def release_reply(self) -> None:
        self.replying = False
        self.lock.release()


class Guards:
    """The guard of every (user id, character name) seen since start-up (or since the user went)."""

    def __init__(self) -> None:
        self._guards: dict[tuple[int, str], Guard] = {}

    def _of(self, user_id: int, name: str) -> Guard:
        return self._guards.setdefault((user_id, name), Guard())

    @contextlib.asynccontextmanager
    async def exclusive(self, user_id: int, name: str) -> AsyncIterator[None]:
        """Hold the guard for a short operation; busy while a reply holds it."""
        guard = self._of(user_id, name)
        if guard.replying:
            raise RoleplayFailure(MSG_BUSY)
        async with guard.lock:
            yield

    async def claim_for_reply(self, user_id: int, name: str) -> Guard:
        """Take the guard for a reply (busy if anything holds it); `Guard.release_reply` gives it back."""
        guard = self._of(user_id, name)
        if guard.replying or guard.lock.locked():
            raise RoleplayFailure(MSG_BUSY)
        await guard.lock.acquire()
        guard.replying = True
        return guard

    def busy(self, user_id: int) -> bool:
        """Whether any operation on one of the user's characters is running."""
        return any(g.lock.locked() for (uid, _), g in self._guards.items() if uid == user_id)

    def forget(self, user_id: int) -> None:
        """Drop the guards of a deleted user."""
        for key in [k for k in self._guards if k[0] == user_id]:
            del self._guards[key]
