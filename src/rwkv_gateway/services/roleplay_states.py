"""The RNN states behind role-play chats: the snapshot store, prefilling text, persona and node states.

Every dialogue node references a snapshot in the engine's state store (docs/architecture.md#the-state-store):
the persona state is keyed by the model and the persona text, so users with identical characters
share it; node states get a fresh key each. A snapshot that is missing, or was made by another model,
is rebuilt from the nodes' text, starting at the nearest earlier node whose snapshot is still there.
Store access runs on worker threads (state files), never on the event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from rwkv_gateway.domain.engine import Engine, SnapshotStore
from rwkv_gateway.domain.roleplay_store import NodeRow
from rwkv_gateway.domain.types import GenerationRequest, Snapshot
from rwkv_gateway.errors import GatewayError, GenerationFailed
from rwkv_gateway.services.roleplay_prompts import (
    NODE_KEY_PREFIX,
    PERSONA_KEY_PREFIX,
    CardText,
    persona_block,
)
from rwkv_gateway.services.roleplay_types import Account

logger = logging.getLogger(__name__)

DIALECT = "roleplay"


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

    def forget_cached(self, key: str) -> None:
        """Nothing to do: this store is its own only copy."""


def new_node_key() -> str:
    return NODE_KEY_PREFIX + uuid.uuid4().hex


def node_keys(nodes: Sequence[NodeRow]) -> list[str]:
    """The node state keys of `nodes` (persona keys, shared by content, are not theirs to delete)."""
    return [n.state_key for n in nodes if n.state_key and n.state_key.startswith(NODE_KEY_PREFIX)]


class ChatStates:
    """Role-play snapshots in the engine's state store, and the prefills that make them."""

    def __init__(self, engine: Callable[[], Engine]) -> None:
        self.engine = engine
        self._fallback_store = _MemoryStore()

    def _store(self, engine: Engine) -> SnapshotStore:
        store = engine.snapshots
        return store if store is not None else self._fallback_store

    def engine_or_none(self) -> Engine | None:
        try:
            return self.engine()
        except GatewayError:
            return None

    async def get(self, engine: Engine, key: str | None) -> Snapshot | None:
        if key is None:
            return None
        try:
            snap = await asyncio.to_thread(self._store(engine).get, key)
        except GatewayError as exc:  # a file made by another model, or corrupt: rebuilt from text
            logger.warning("role-play state %s unusable: %s", key, exc.message)
            return None
        return snap if isinstance(snap, Snapshot) else None

    async def put(self, engine: Engine, key: str, snap: Snapshot) -> None:
        await asyncio.to_thread(self._store(engine).put, key, snap, persist=True)

    async def delete(self, keys: list[str], engine: Engine | None = None) -> None:
        """Drop `keys` from the store (of `engine`, else of the model if loaded); a failure is logged,
        never raised."""
        engine = engine if engine is not None else self.engine_or_none()
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

    async def feed(self, engine: Engine, state: Snapshot | None, text: str, account: Account) -> Snapshot:
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

    async def persona(self, engine: Engine, card: CardText, account: Account) -> tuple[str, Snapshot]:
        """The persona state of `card` and its key, prefilled and stored on first use."""
        block = persona_block(card)
        key = self._persona_key(engine, block)
        snap = await self.get(engine, key)
        if snap is None:
            snap = await self.feed(engine, None, block, account)
            await self.put(engine, key, snap)
        return key, snap

    async def of_node(
        self, engine: Engine, nodes: Sequence[NodeRow], index: int, card: CardText, account: Account
    ) -> Snapshot:
        """The snapshot after node `index`. One that is missing (or was made by another model) is
        rebuilt from the nodes' text, starting at the nearest earlier node whose snapshot exists
        (at worst the persona state), and stored again."""
        start = index
        while True:
            node = nodes[start]
            snap = await self.get(engine, node.state_key)
            if snap is not None:
                break
            if node.role == "system" or (start == 1 and nodes[0].role == "system"):
                # The persona block (greeting line included) is the state of these two nodes.
                _, snap = await self.persona(engine, card, account)
                break
            start -= 1
        for node in nodes[start + 1 : index + 1]:
            logger.info("rebuilding role-play state of node %s from its text", node.id)
            snap = await self.feed(engine, snap, node.context_text or "", account)
            if node.state_key is not None:
                await self.put(engine, node.state_key, snap)
        return snap
