"""1,000 streamed OpenAI requests against a live server, 32 at a time, half of them dropped by their
client mid-stream: every kept stream completes with `[DONE]`, the server keeps answering, the running
batch and the queue drain to 0, every dropped stream is counted as cancelled, the state cache stays
within its byte budget, and the process's memory returns near its level after a warm-up."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from pathlib import Path

import httpx

from support.live import start_server

REQUESTS = 1000
CONCURRENCY = 32
WARMUP = 64
KEPT_TOKENS = 4
#: Dropped streams ask for more than they read, so they are cut while generating.
DROPPED_TOKENS = 256
#: Allocator slack: arenas kept by glibc and torch after a burst, not a leak (a leak of one state per
#: request would be ~70 KiB x 1,000).
RSS_SLACK = 48 * 2**20
STATE_CACHE_MB = 4


def metric(text: str, name: str, labels: str = "") -> float:
    pattern = rf"^{re.escape(name)}{re.escape(labels)} (\S+)$"
    values = [float(m.group(1)) for m in re.finditer(pattern, text, re.MULTILINE)]
    assert len(values) == 1, (name, labels, values)
    return values[0]


async def one(client: httpx.AsyncClient, model: str, i: int) -> str:
    drop = i % 2 == 1
    body = {
        "model": model,
        "messages": [{"role": "user", "content": f"Request {i}: say something about the number {i}."}],
        "max_tokens": DROPPED_TOKENS if drop else KEPT_TOKENS,
        "stream": True,
    }
    async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200, await resp.aread()
        lines: list[str] = []
        async for line in resp.aiter_lines():
            if line.startswith("data: "):
                lines.append(line[6:])
            if drop and len(lines) == 2:  # the role chunk and one token: then hang up
                return "dropped"
        assert lines[-1] == "[DONE]", lines[-3:]
        assert '"finish_reason":"length"' in lines[-2], lines[-2]
        return "completed"


async def storm(url: str, model: str, indices: range) -> dict[str, int]:
    outcome = {"completed": 0, "dropped": 0}
    sem = asyncio.Semaphore(CONCURRENCY)
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def guarded(i: int) -> None:
            async with sem:
                outcome[await one(client, model, i)] += 1

        await asyncio.gather(*(guarded(i) for i in indices))
    return outcome


async def wait_idle(url: str) -> dict[str, object]:
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        for _ in range(600):
            body: dict[str, object] = (await client.get("/readyz")).json()
            if body["active_sequences"] == 0 and body["queue_depth"] == 0:
                return body
            await asyncio.sleep(0.05)
    raise AssertionError(f"engine never went idle: {body}")


async def test_a_thousand_requests_half_dropped(
    v7_path: Path, tmp_path: Path, figure: Callable[[str], None]
) -> None:
    live = start_server(
        v7_path,
        tmp_path / "data",
        max_batch_size=str(CONCURRENCY),
        state_cache_mb=str(STATE_CACHE_MB),
    )
    await storm(live.url, live.model_name, range(WARMUP))
    await wait_idle(live.url)
    baseline = live.rss_bytes()
    outcome = await storm(live.url, live.model_name, range(WARMUP, WARMUP + REQUESTS))
    assert outcome == {"completed": REQUESTS // 2, "dropped": REQUESTS // 2}
    async with httpx.AsyncClient(base_url=live.url, timeout=30) as client:
        # Still answering: a plain request right after the storm.
        resp = await client.post(
            "/v1/chat/completions",
            json={"model": live.model_name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
        )
        assert resp.status_code == 200
        ready = await wait_idle(live.url)
        assert ready["status"] == "ready"
        after = live.rss_bytes()
        text = (await client.get("/metrics")).text
    cancelled = metric(
        text, "rwkv_gateway_requests_finished_total", '{dialect="openai",finish_reason="cancelled"}'
    )
    lengths = metric(
        text, "rwkv_gateway_requests_finished_total", '{dialect="openai",finish_reason="length"}'
    )
    assert cancelled == (WARMUP + REQUESTS) // 2
    assert lengths == (WARMUP + REQUESTS) // 2 + 1
    assert metric(text, "rwkv_gateway_requests_running") == 0
    assert metric(text, "rwkv_gateway_requests_waiting") == 0
    cache_bytes = metric(text, "rwkv_gateway_state_cache_bytes")
    assert cache_bytes <= metric(text, "rwkv_gateway_state_cache_budget_bytes") == STATE_CACHE_MB * 2**20
    assert after <= baseline + RSS_SLACK, (baseline, after)
    assert live.stop() == 0
    figure(
        f"disconnect storm: {REQUESTS} streams ({CONCURRENCY} at a time), {outcome['dropped']} dropped "
        f"mid-stream, {outcome['completed']} completed with [DONE], {int(cancelled)} cancelled in the "
        "engine, "
        f"running 0, waiting 0, state cache {cache_bytes / 2**20:.1f}/{STATE_CACHE_MB} MiB, "
        f"RSS {baseline / 2**20:.0f} -> {after / 2**20:.0f} MiB"
    )
