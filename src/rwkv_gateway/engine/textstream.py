"""From generated token ids to streamable text: whole characters only, and stop strings never leaked.

`IncrementalDecoder` joins token bytes until they form complete UTF-8 characters, so a character that
the model spells over several tokens is sent once, intact. `StopMatcher` sits after it and holds back
any tail that might still grow into a stop string, cutting the text at the earliest stop.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence

from rwkv_gateway.engine.tokenizer import Tokenizer


class IncrementalDecoder:
    """Turns token ids into text pieces that are always whole characters (no partial UTF-8, no U+FFFD from a
    character split across tokens). Uses codecs' incremental UTF-8 decoder with errors="replace" so bytes that
    can never form a character still come out (as U+FFFD) instead of stalling the stream forever."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Text completed by this token; "" while a character is still incomplete."""
        return self._decoder.decode(self._tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        """End of stream: whatever bytes are left (replaced if incomplete)."""
        text = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        return text


class StopMatcher:
    """Holds back text that could be the start of a stop string, so a stop string never leaks partially.

    A stop matches as soon as all of it has been pushed; when several are complete at once, the one
    starting earliest wins (the shortest on a tie, as it was complete first). Once matched, or flushed,
    the matcher is finished and further pushes return nothing.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        # dict.fromkeys keeps the caller's order while dropping duplicates and empty strings.
        self._stops = tuple(dict.fromkeys(s for s in stops if s))
        self._prefixes = frozenset(s[:k] for s in self._stops for k in range(1, len(s)))
        self._longest_prefix = max((len(s) - 1 for s in self._stops), default=0)
        self._pending = ""
        self._finished = False
        self.matched: str | None = None

    @property
    def finished(self) -> bool:
        return self._finished

    def push(self, text: str) -> tuple[str, str | None]:
        """(text safe to emit now, matched stop or None). On a match, the emitted text is everything
        before the earliest match and the matcher is finished."""
        if self._finished:
            return "", None
        if not self._stops:
            return text, None
        buf = self._pending + text
        # The pending text held no complete stop, so a match must end inside the new text.
        held = len(self._pending)
        best_at = -1
        best_stop = ""
        for stop in self._stops:
            at = buf.find(stop, max(0, held - len(stop) + 1))
            if at >= 0 and (best_at < 0 or at < best_at or (at == best_at and len(stop) < len(best_stop))):
                best_at, best_stop = at, stop
        if best_at >= 0:
            self._pending = ""
            self._finished = True
            self.matched = best_stop
            return buf[:best_at], best_stop
        keep = self._held_back(buf)
        self._pending = buf[len(buf) - keep :]
        return buf[: len(buf) - keep], None

    def _held_back(self, buf: str) -> int:
        """Length of the longest suffix of `buf` that is a proper prefix of some stop."""
        for k in range(min(len(buf), self._longest_prefix), 0, -1):
            if buf[-k:] in self._prefixes:
                return k
        return 0

    def flush(self) -> str:
        """End of stream without a match: release the held-back tail."""
        text = self._pending
        self._pending = ""
        self._finished = True
        return text
