"""The reply stream of `/chat/reply` and `/chat/resay`: the original's framing
(docs/roleplay.md#11-the-reply-stream).

Each chunk is `"\\n\\ndata: "` followed by the whole reply so far (not a delta); the last chunk
carries the stripped final reply; nothing else (no `id:`, no `[DONE]`, no trailing newline). Every
chunk is sent at once. The response watches for the client going away on its own (whatever ASGI
version the server speaks) and then closes the texts, which drops the reply (see the router).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable

from fastapi import Response
from starlette.types import Receive, Scope, Send

logger = logging.getLogger(__name__)

EVENT_PREFIX = "\n\ndata: "
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def reply_events(texts: AsyncIterator[str]) -> AsyncGenerator[bytes, None]:
    async for text in texts:
        yield (EVENT_PREFIX + text).encode("utf-8")


class ReplyStream(Response):
    """A streamed reply that stops as soon as the client disconnects; either way it closes `texts`
    and calls `close`, and a reply that did not reach its end is dropped."""

    media_type = "text/event-stream; charset=utf-8"

    def __init__(self, texts: AsyncGenerator[str, None], close: Callable[[], None]) -> None:
        super().__init__(content=None, headers=HEADERS, media_type=self.media_type)
        self.texts = texts
        #: Ends the reply whatever happened (even if `texts` never started).
        self.close = close
        # No Content-Length: the body is chunked.
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:  # noqa: ARG002
        events = reply_events(self.texts)

        async def pump() -> None:
            await send(
                {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
            )
            async for chunk in events:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        async def watch() -> None:
            # The body was read by the route, so the next message can only be the disconnect.
            while (await receive())["type"] != "http.disconnect":
                pass

        pumping = asyncio.create_task(pump())
        watching = asyncio.create_task(watch())
        try:
            done, _ = await asyncio.wait({pumping, watching}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (pumping, watching):
                task.cancel()
            for task in (pumping, watching):
                with contextlib.suppress(asyncio.CancelledError, OSError, Exception):
                    await task
            await events.aclose()
            await self.texts.aclose()
            self.close()
        if pumping in done and not pumping.cancelled() and pumping.exception() is not None:
            logger.info("role-play stream ended early: %s", pumping.exception())
