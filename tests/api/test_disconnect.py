"""The one disconnect race (api/common/disconnect.py): a response's work, streamed or not, stops as
soon as its client goes away, and nothing it started outlives the request."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

import pytest

from rwkv_gateway.api.common.disconnect import ClientDisconnected, WatchedStream, race_disconnect


class Client:
    """An ASGI client that disconnects once `gone` is set."""

    def __init__(self) -> None:
        self.gone = asyncio.Event()
        self.sent: list[dict[str, Any]] = []

    async def receive(self) -> dict[str, Any]:
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)
        if message.get("body"):
            self.gone.set()  # leaves after the first chunk


async def test_work_outlived_by_its_client_is_cancelled() -> None:
    client = Client()
    cancelled = asyncio.Event()

    async def forever() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()

    asyncio.get_running_loop().call_soon(client.gone.set)
    with pytest.raises(ClientDisconnected):
        await race_disconnect(client.receive, forever())
    assert cancelled.is_set()


async def test_work_that_finishes_first_gives_its_result_or_its_error() -> None:
    client = Client()

    async def answer() -> int:
        return 42

    async def fail() -> None:
        raise ValueError("boom")

    assert await race_disconnect(client.receive, answer()) == 42
    with pytest.raises(ValueError, match="boom"):
        await race_disconnect(client.receive, fail())


async def test_a_watched_stream_stops_at_the_disconnect_and_closes_its_body() -> None:
    client = Client()
    closed = asyncio.Event()

    async def body() -> AsyncGenerator[bytes, None]:
        try:
            yield b"first"
            await asyncio.Event().wait()  # the next chunk never comes
            yield b"never"
        finally:
            closed.set()

    response = WatchedStream(body(), media_type="text/plain")
    await asyncio.wait_for(response({"type": "http"}, client.receive, client.send), 10)
    assert closed.is_set()
    assert [m.get("body") for m in client.sent if m["type"] == "http.response.body"] == [b"first"]
