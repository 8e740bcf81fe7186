"""Disconnect = cancellation, for the responses that watch for it themselves.

sse-starlette cancels an SSE stream when its client goes away; everything else here uses the one
race of this module (`race_disconnect`: the work against a watcher of the ASGI `receive` channel).
`unless_disconnected` runs a non-streaming response's work under it, so a JSON answer nobody waits
for stops generating instead of keeping its engine slots busy to the end. `WatchedStream` is the raw
(non-SSE) streamed body under it: it stops as soon as the client disconnects, whatever ASGI version
the server speaks (on ASGI 2.4 Starlette's own StreamingResponse notices only when a send fails,
which may be long after the client left), and then closes its body.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Awaitable
from typing import TypeVar

from fastapi import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from rwkv_gateway.errors import GatewayError

logger = logging.getLogger(__name__)

T = TypeVar("T")


class ClientDisconnected(GatewayError):
    code = "client_disconnected"
    http_status = 499


async def _disconnected(receive: Receive) -> None:
    # The route has read the body, so the next ASGI message can only be the disconnect.
    while (await receive())["type"] != "http.disconnect":
        pass


async def race_disconnect(receive: Receive, work: Awaitable[T]) -> T:
    """Await `work`; if the client disconnects first, cancel it and raise ClientDisconnected."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(receive))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        # The loser (both, if this wait is itself cancelled) is cancelled and awaited, so nothing
        # outlives the request; a cancelled work's outcome has nobody left to go to.
        for pending in (task, watcher):
            pending.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)
    if task in done:
        return task.result()
    raise ClientDisconnected("the client closed the connection")


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work` (a non-streaming response's generation) unless the client goes away first."""
    return await race_disconnect(request.receive, work)


class WatchedStream(StreamingResponse):
    """A streamed body sent under `race_disconnect`; `aclose` runs however the response ends."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:  # noqa: ARG002
        try:
            await race_disconnect(receive, self.stream_response(send))
        except ClientDisconnected:
            pass
        except Exception as exc:
            # The status line is out: nothing can be rendered any more, so the log says why it ended.
            logger.info("stream ended early: %s", exc)
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        """The response is over: close the body's generator (its `finally` blocks run now)."""
        if isinstance(self.body_iterator, AsyncGenerator):
            await self.body_iterator.aclose()
