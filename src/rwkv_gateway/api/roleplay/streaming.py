"""The reply stream of `/chat/reply` and `/chat/resay`: the original's framing
(docs/roleplay.md#11-the-reply-stream).

Each chunk is `"\\n\\ndata: "` followed by the whole reply so far (not a delta); the last chunk
carries the stripped final reply; nothing else (no `id:`, no `[DONE]`, no trailing newline). Every
chunk is sent at once. The response watches for the client going away on its own (`WatchedStream`,
whatever ASGI version the server speaks) and then closes the texts, which drops the reply (see the
router).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Callable

from rwkv_gateway.api.common.disconnect import WatchedStream

EVENT_PREFIX = "\n\ndata: "
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def reply_events(texts: AsyncIterator[str]) -> AsyncGenerator[bytes, None]:
    async for text in texts:
        yield (EVENT_PREFIX + text).encode("utf-8")


class ReplyStream(WatchedStream):
    """A streamed reply that stops as soon as the client disconnects; either way it closes `texts`
    and calls `close`, and a reply that did not reach its end is dropped."""

    media_type = "text/event-stream; charset=utf-8"

    def __init__(self, texts: AsyncGenerator[str, None], close: Callable[[], None]) -> None:
        super().__init__(reply_events(texts), headers=HEADERS, media_type=self.media_type)
        self.texts = texts
        #: Ends the reply whatever happened (even if `texts` never started).
        self.close = close

    async def aclose(self) -> None:
        await super().aclose()
        await self.texts.aclose()
        self.close()
