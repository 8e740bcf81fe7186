"""The HTTP server `rwkv-gateway serve` runs: uvicorn, with a drain on SIGTERM/SIGINT.

`build_server(app, settings)` configures uvicorn for the app and returns a `GracefulServer`, which lets
in-flight requests finish for `drain_timeout_s`, ends what still generates in-band, tears the lifespan
down and exits 0 (see docs/operations.md#shutdown-overload-and-faults). The CLI imports this module
only when it serves, so the other commands start without uvicorn.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import signal
import types
from collections.abc import Iterator
from typing import Any, cast

import uvicorn
from fastapi import FastAPI
from sse_starlette.sse import AppStatus

from rwkv_gateway.app import end_generation, services_of
from rwkv_gateway.settings import Settings

#: After the drain deadline ends the engine's streams, how long their connections get to write the
#: in-band error and terminator before uvicorn cancels what is left.
DRAIN_GRACE_S = 5.0


class GracefulServer(uvicorn.Server):
    """Drain on SIGTERM/SIGINT: readiness turns 503 at once (the model slot's `draining`), uvicorn stops
    accepting and waits for the open connections; at `drain_timeout_s` whatever still generates is
    ended in-band (`end_generation`), then the lifespan tears down (Task API runs record their
    state, the engine stops, the database closes) and the process exits 0.

    uvicorn re-raises a captured SIGTERM after its graceful shutdown, so the process would die
    of the signal (exit -15). SIGTERM is how orchestrators ask for a normal stop: exit 0 instead."""

    def handle_exit(self, sig: int, frame: types.FrameType | None) -> None:
        # Before the main loop's next tick closes the sockets: a probe on a kept-alive connection
        # already sees 503.
        services_of(cast("FastAPI", self.config.app)).model.draining = True
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: list[Any] | None = None) -> None:
        app = cast("FastAPI", self.config.app)
        services = services_of(app)
        services.model.draining = True
        settings = services.settings

        async def deadline() -> None:
            await asyncio.sleep(settings.drain_timeout_s)
            await end_generation(app)
            # A stream that still has not ended (it waits on something other than the engine)
            # is closed by sse-starlette before uvicorn cancels it outright.
            await asyncio.sleep(DRAIN_GRACE_S / 2)
            AppStatus.should_exit = True

        timer = asyncio.create_task(deadline(), name="drain-deadline")
        try:
            await super().shutdown(sockets)
        finally:
            if not timer.done():
                timer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await timer

    def run(self, sockets: list[Any] | None = None) -> None:
        # sse-starlette would otherwise end every SSE stream the moment the signal arrives, cutting
        # the in-flight streams the drain exists to let finish; the deadline above ends them.
        AppStatus.disable_automatic_graceful_drain()  # type: ignore[no-untyped-call]
        super().run(sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            yield
            self._captured_signals = [s for s in self._captured_signals if s != signal.SIGTERM]


def build_server(app: FastAPI, settings: Settings) -> GracefulServer:
    """A server for `app` on the settings' address, with the drain's timing."""
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,
        # In-flight connections get the drain time, then the grace for their in-band ending.
        timeout_graceful_shutdown=math.ceil(settings.drain_timeout_s + DRAIN_GRACE_S),
    )
    return GracefulServer(config)
