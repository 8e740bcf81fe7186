"""Waiting for the engine of an app under test."""

from __future__ import annotations

import asyncio
from typing import Any


async def idle(engine: Any, timeout_s: float = 30.0) -> None:
    """Wait until the engine has nothing running or waiting: a chat reply is prefilled for the next
    turn after the response is sent, so a sequence can still be active when the client has its answer
    (a human types slower than that)."""
    for _ in range(int(timeout_s / 0.01)):
        stats = engine.stats()
        if stats["active_sequences"] == 0 and stats["queue_depth"] == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("engine never went idle")
