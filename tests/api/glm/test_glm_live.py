"""The ChatGLM-style stream against a live `rwkv_gateway serve` (uvicorn on a free port): a client that
reads the chunked body as it arrives and appends with `+=` rebuilds the one-shot reply, and a client
that goes away (stream or one-shot) frees its engine slot."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from glmwire import SEP, StreamResult, check_frame

from support.live import live_server


@pytest.fixture(scope="module")
def base_url(v7_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    # A huge reply budget lets a test start a reply that only ends when its client goes away.
    with live_server(v7_path, tmp_path_factory.mktemp("glm-live"), max_new_tokens="1000000") as live:
        yield live.url


def wait_idle(base_url: str, timeout: float = 60.0) -> None:
    """Poll /readyz until no sequence is active (the test fails if that never happens)."""
    deadline = time.monotonic() + timeout
    while True:
        body: dict[str, Any] = httpx.get(f"{base_url}/readyz", timeout=5).json()
        if body["active_sequences"] == 0 and body["queue_depth"] == 0:
            return
        assert time.monotonic() < deadline, f"engine still busy: {body}"
        time.sleep(0.05)


def read_stream(resp: httpx.Response, result: StreamResult, limit: int | None = None) -> None:
    buffer = b""
    for chunk in resp.iter_raw():
        result.raw += chunk
        buffer += chunk
        while SEP in buffer:
            frame, buffer = buffer.split(SEP, 1)
            check_frame(frame, result)
            if limit is not None and len(result.events) >= limit:
                return
    assert buffer == b""


def test_a_live_stream_rebuilt_with_plus_equals_is_the_one_shot_reply(base_url: str) -> None:
    body = {
        "prompt": "Tell me about the sea.",
        "history": [["Hi", "Hello!"]],
        "temperature": 0,
        "max_length": 70,
    }
    whole = httpx.post(f"{base_url}/chat", json=body, timeout=120)
    assert whole.status_code == 200, whole.text
    result = StreamResult()
    with (
        httpx.Client(timeout=120) as client,
        client.stream("POST", f"{base_url}/chat-stream", json=body) as resp,
    ):
        assert resp.status_code == 200
        assert resp.headers["content-type"] == "text/event-stream; charset=utf-8"
        assert resp.headers["transfer-encoding"] == "chunked"
        read_stream(resp, result)
    assert result.content == whole.json()["content"]
    assert result.events[-1]["completion_tokens"] == whole.json()["completion_tokens"]


def test_a_stream_whose_client_leaves_frees_its_engine_slot(base_url: str) -> None:
    wait_idle(base_url)
    body = {"prompt": "Count forever.", "temperature": 0, "max_length": 1_000_000}
    result = StreamResult()
    with (
        httpx.Client(timeout=120) as client,
        client.stream("POST", f"{base_url}/chat-stream", json=body) as resp,
    ):
        assert resp.status_code == 200
        read_stream(resp, result, limit=3)
    assert len(result.events) == 3
    wait_idle(base_url)  # without cancellation this reply would run for a million tokens


def test_a_one_shot_chat_whose_client_leaves_frees_its_engine_slot(base_url: str) -> None:
    wait_idle(base_url)
    body = {"prompt": "Count forever.", "temperature": 0, "max_length": 1_000_000}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base_url}/chat", json=body, timeout=httpx.Timeout(5.0, read=1.0))
    wait_idle(base_url)
