"""The prefix cache: states of token prefixes kept in the state store, so a prompt that starts like an
earlier one prefills only what is new (see docs/chat-prompts.md#3-prefix-cache).

A chat prompt arrives as segments (one per turn); the ends of the segments are the checkpoint
boundaries. Prefill chunks end exactly on them, the state there is stored under the SHA-256 of the
prefix's token ids, and a later request starts from its longest stored boundary. After a reply, the
sequence prefills the reply the way the next turn will send it back and checkpoints that too. Every
function here runs on the model thread inside a step, except `segment_boundaries` (admission) and
`prefilled_by_another` (the event loop, between steps).
"""

from __future__ import annotations

import hashlib
import logging
from array import array
from collections.abc import Sequence

from rwkv_gateway.engine.protocol import Backend
from rwkv_gateway.engine.snapshot import StateSnapshot
from rwkv_gateway.engine.states import StateStore
from rwkv_gateway.engine.stream import GenerationSequence
from rwkv_gateway.engine.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


def prefix_key(tokens: Sequence[int]) -> str:
    return "prefix:" + hashlib.sha256(array("i", tokens).tobytes()).hexdigest()


def segment_boundaries(pieces: Sequence[Sequence[int]], min_gap: int) -> tuple[int, ...]:
    """Where the prompt's segments end (checkpoint boundaries), in tokens."""
    ends = sorted({sum(len(p) for p in pieces[: i + 1]) for i in range(len(pieces))} - {0})
    # No checkpoint just before a short closing piece (the "Assistant:" after the last user
    # turn): it would cost a prefill step of its own for a prefix no later request starts
    # from, since the next turn continues from the state after the reply.
    if len(ends) > 1 and ends[-1] - ends[-2] < min_gap:
        del ends[-2]
    return tuple(ends)


def to_checkpoint(seq: GenerationSequence) -> int:
    """Prompt tokens until the next checkpoint, so prefill chunks end exactly on them."""
    if not seq.cache_on or seq.followup is not None:
        return len(seq.pending)
    for end in seq.boundaries:
        if end > seq.pos:
            return end - seq.pos
    return len(seq.pending)


def longest_cached_prefix(states: StateStore, seq: GenerationSequence) -> tuple[int, StateSnapshot] | None:
    for end in reversed(seq.boundaries):
        snap = states.get(prefix_key(seq.prompt[:end]))
        if isinstance(snap, StateSnapshot) and snap.logits is not None and snap.token_count == end:
            return end, snap
    return None


def checkpoint(
    states: StateStore, backend: Backend, seq: GenerationSequence, tokens: list[int], counters: dict[str, int]
) -> StateSnapshot | None:
    """Cache the current state (with its logits) as the state of `tokens`."""
    assert seq.state is not None
    key = prefix_key(tokens)
    try:
        existing = states.get(key)
        if isinstance(existing, StateSnapshot):
            return existing
        snap = backend.capture(seq.state, len(tokens), seq.logits)
        states.put(key, snap)
        counters["checkpoints"] += 1
        return snap
    except Exception:  # the cache is an optimisation: never fail a request over it
        logger.exception("prefix checkpoint failed")
        return None


def prefilled_by_another(seq: GenerationSequence, active: Sequence[GenerationSequence]) -> bool:
    """Whether an active sequence is prefilling a checkpoint this one could start from.

    Concurrent identical prefixes (several users of one system prompt, n retries of one chat) are
    then computed once: this sequence waits until the checkpoint exists, then continues from it.
    """
    if not seq.cache_on or seq.state is not None:
        return False
    for other in active:
        if not other.cache_on or other.followup is not None or other.generated or not other.pending:
            continue
        shared = [b for b in seq.boundaries if b > other.pos and b in other.boundaries]
        if any(seq.prompt[:b] == other.prompt[:b] for b in reversed(shared)):
            return True
    return False


def start_from_cache(
    states: StateStore | None, seq: GenerationSequence, counters: dict[str, int]
) -> StateSnapshot | None:
    """Start `seq` from its longest cached prefix (None: from the zero state)."""
    cached = longest_cached_prefix(states, seq) if seq.cache_on and states is not None else None
    if cached is None:
        return None
    n, snap = cached
    seq.pending, seq.pos, seq.cached, seq.token_count = seq.prompt[n:], n, n, n
    counters["cached_tokens"] += n
    if not seq.pending:
        seq.logits = snap.logits
    seq.prompt_snapshot = followup_base_snapshot(states, seq, snap)
    return snap


def followup_base_snapshot(
    states: StateStore | None, seq: GenerationSequence, cached: StateSnapshot
) -> StateSnapshot | None:
    """The state a reply follow-up starts from, when the prompt started from a cached prefix.

    `cached` holds the prompt's first `seq.pos` tokens. The base is that state, a later boundary
    (captured when prefill passes it) or, for a follow-up that replaces the prompt's last pieces, an
    earlier checkpoint still in the cache (none: the follow-up is skipped).
    """
    if seq.request.reply_followup is None or seq.pos < seq.followup_base:
        return None
    if seq.pos == seq.followup_base:
        return cached
    snap = states.get(prefix_key(seq.prompt[: seq.followup_base])) if states is not None else None
    return snap if isinstance(snap, StateSnapshot) and snap.token_count == seq.followup_base else None


def start_followup(seq: GenerationSequence, tokenizer: Tokenizer, backend: Backend) -> bool:
    """After a reply: prefill it the way the next turn will send it back (see `reply_followup`)."""
    followup = seq.request.reply_followup
    if not seq.cache_on or followup is None or seq.prompt_snapshot is None:
        return False
    try:
        pieces = followup("".join(seq.text_parts))
        # Piece by piece, as the next request's segments will be tokenized.
        tokens = [
            t for piece in ((pieces,) if isinstance(pieces, str) else pieces) for t in tokenizer.encode(piece)
        ]
        if not tokens:
            return False
        seq.state = backend.restore(seq.prompt_snapshot)
    except Exception:
        logger.exception("reply follow-up of request %s failed", seq.request.request_id)
        return False
    seq.followup, seq.pending = tokens, list(tokens)
    seq.last_token, seq.logits, seq.finishing = None, None, None
    return True
