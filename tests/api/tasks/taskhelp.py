"""Helpers for the Task API tests: waiting for tasks, parsing SSE bodies, greedy settings, token ids
from the engine itself."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import httpx

from rwkv_gateway.domain.types import GenerationRequest, SamplingParams, TextDelta
from support.app import Served

#: `async with app_on(data_dir, **settings) as served:` (the fixture in conftest.py).
RestartFactory = Callable[..., contextlib.AbstractAsyncContextManager[Served]]

#: Greedy and without penalties: one run of N tokens equals runs of k and N - k tokens on one state.
GREEDY: dict[str, Any] = {"temperature": 0, "presence_penalty": 0}
TMP_ID = re.compile(r"TMP_[0-9a-f]{32}")
TASK_ID = re.compile(r"TASK_[0-9a-f]{32}")
TMPL_ID = re.compile(r"_TMPL_[0-9a-f]{32}")
TASK_RESPONSE_KEYS = {"task_id", "result", "prefill_time", "gen_time", "speed", "finished"}


async def wait_finished(client: httpx.AsyncClient, task_id: str) -> dict[str, Any]:
    """Poll get_result until the task reports finished (at most two minutes); its last TaskResponse."""
    async with asyncio.timeout(120):
        while True:
            resp = await client.get(f"/v1/tasks/{task_id}/get_result")
            assert resp.status_code == 200, resp.text
            body: dict[str, Any] = resp.json()
            if body["finished"]:
                return body
            await asyncio.sleep(0.02)


T = TypeVar("T")


async def eventually(probe: Callable[[], Awaitable[T]]) -> T:
    """Poll `probe` until it returns something truthy (at most a minute); that value."""
    async with asyncio.timeout(60):
        for _ in itertools.count():
            if value := await probe():
                return value
            await asyncio.sleep(0.01)
    raise AssertionError("unreachable")


async def wait_status(client: httpx.AsyncClient, task_id: str, status: int) -> None:
    """Poll status until it is `status` (at most a minute)."""
    async with asyncio.timeout(60):
        for _ in iter(int, 1):  # until found
            if (await client.get(f"/v1/tasks/{task_id}/status")).json()["status"] == status:
                return
            await asyncio.sleep(0.01)


async def create(client: httpx.AsyncClient, route: str = "tmp", **body: Any) -> str:
    resp = await client.post(f"/v1/tasks/{route}", json=body)
    assert resp.status_code == 200, resp.text
    task_id: str = resp.json()["task_id"]
    return task_id


async def generate(client: httpx.AsyncClient, route: str = "tmp", **body: Any) -> tuple[str, str]:
    """Create a task, wait for it: (id, result)."""
    task_id = await create(client, route, **body)
    return task_id, (await wait_finished(client, task_id))["result"]


def sse_payloads(text: str) -> list[str]:
    """The `data:` payloads of an SSE body, in order (the body must use `data: ...\\n\\n` framing)."""
    assert text.endswith("\n\n"), text[-50:]
    payloads = []
    for block in text.split("\n\n")[:-1]:
        lines = [line for line in block.split("\n") if not line.startswith(":")]
        if not lines:
            continue
        assert len(lines) == 1 and lines[0].startswith("data: "), block
        payloads.append(lines[0][len("data: ") :])
    return payloads


def sse_events(text: str) -> list[dict[str, Any]]:
    """The JSON events of an SSE body; the body must end with `data: [DONE]`."""
    payloads = sse_payloads(text)
    assert payloads[-1] == "[DONE]", payloads[-3:]
    return [json.loads(p) for p in payloads[:-1]]


def streamed_text(text: str) -> str:
    return "".join(e["data"] for e in sse_events(text) if "data" in e)


async def engine_tokens(served: Served, prompt: str, max_tokens: int) -> tuple[list[int], str]:
    """Greedy generation on the served engine itself: the generated token ids and the text."""
    engine = served.app.state.services.model.engine
    stream = await engine.submit(
        GenerationRequest(
            prompt=prompt,
            max_tokens=max_tokens,
            sampling=SamplingParams(temperature=0),
            use_prefix_cache=False,
        )
    )
    ids: list[int] = []
    parts: list[str] = []
    async for event in stream:
        if isinstance(event, TextDelta):
            ids.extend(event.token_ids)
            parts.append(event.text)
    text = "".join(parts)
    # The demo model never samples partial-UTF-8 tokens, so every delta names its one token.
    assert engine.codec.decode(ids) == text
    return ids, text
