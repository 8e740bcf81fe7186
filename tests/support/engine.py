"""Waiting for the engine of an app under test, and a ModelInfo to describe a checkpoint."""

from __future__ import annotations

import asyncio
from pathlib import PurePath
from typing import Any

from rwkv_gateway.domain.engine import ModelInfo


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


def model_info(path: str) -> ModelInfo:
    """A ModelInfo for a checkpoint at `path` (what the chat template is chosen from)."""
    return ModelInfo(
        name=PurePath(path).stem,
        path=path,
        model_id="0" * 16,
        version="7",
        n_layer=2,
        n_embd=128,
        vocab_size=65536,
        strategy="cpu fp32",
        dtype="fp32",
        device="cpu",
    )
