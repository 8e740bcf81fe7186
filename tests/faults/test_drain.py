"""SIGTERM drains a live server: readiness turns 503 / new connections are refused, in-flight streams
run to their natural end (or, past `drain_timeout_s`, end in-band with their terminator), role-play
state written by a stream that finished during the drain survives the restart, and the exit code is 0."""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from live import CARD, GREEDY, form, reply_frames

from support.live import LiveServer, log_tail, start_server

STREAM_TOKENS = 120


class Stream(threading.Thread):
    """POST a streaming request on its own connection; `started` is set at the first body chunk."""

    def __init__(self, url: str, **kwargs: Any) -> None:
        super().__init__(daemon=True)
        self.url, self.kwargs = url, kwargs
        self.started = threading.Event()
        self.status = 0
        self.body = b""
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with httpx.Client(timeout=120) as client, client.stream("POST", self.url, **self.kwargs) as resp:
                self.status = resp.status_code
                for chunk in resp.iter_raw():
                    self.body += chunk
                    self.started.set()
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            self.started.set()

    def result(self) -> bytes:
        self.join(120)
        assert not self.is_alive()
        assert self.error is None, repr(self.error)
        assert self.status == 200
        return self.body


def sse_data(body: bytes) -> list[str]:
    return [line[6:] for line in body.decode().split("\n") if line.startswith("data: ")]


def probe_after_sigterm(live: LiveServer) -> str:
    """What a new client sees once SIGTERM was sent: a refused connection or a 503 readiness."""
    try:
        resp = httpx.get(f"{live.url}/readyz", timeout=10)
    except httpx.TransportError:
        return "refused"
    assert resp.status_code == 503, resp.text
    assert resp.json() == {"status": "draining"}
    return "503"


def openai_stream(live: LiveServer, max_tokens: int) -> Stream:
    body = {
        "model": live.model_name,
        "messages": [{"role": "user", "content": "Tell me a long story."}],
        "max_tokens": max_tokens,
        "stream": True,
        "temperature": 0,
    }
    return Stream(f"{live.url}/v1/chat/completions", json=body)


def test_sigterm_lets_streams_finish_persists_and_exits_0(
    v7_path: Path, tmp_path: Path, figure: Callable[[str], None]
) -> None:
    data_dir = tmp_path / "data"
    live = start_server(v7_path, data_dir, drain_timeout_s="60", roleplay_max_reply_tokens="48")
    me = httpx.post(f"{live.url}/login/tmp", **form({"token": "null"}), timeout=30).json()["data"]
    auth = {"user_name": me["user_name"], "token": me["token"]}
    assert (
        httpx.post(f"{live.url}/characters/save", **form({**auth, **CARD}), timeout=30).json()["code"] == 200
    )
    chat = {**auth, "character_name": CARD["bot"]}
    assert httpx.post(f"{live.url}/characters/load", **form(chat), timeout=30).json()["code"] == 200

    streams = [
        openai_stream(live, STREAM_TOKENS),
        Stream(f"{live.url}/chat/reply", **form({**chat, "prompt": "讲个故事", **GREEDY})),
    ]
    for s in streams:
        s.start()
    for s in streams:
        assert s.started.wait(60)
    live.proc.send_signal(signal.SIGTERM)
    probe = probe_after_sigterm(live)

    chunks = sse_data(streams[0].result())
    assert chunks[-1] == "[DONE]"
    events = [json.loads(c) for c in chunks[:-1]]
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert not any("error" in e for e in events)
    generated = sum(1 for e in events if e["choices"] and e["choices"][0]["delta"].get("content"))
    reply = reply_frames(streams[1].result().decode())[-1]
    assert live.proc.wait(timeout=60) == 0, log_tail(live.log)

    # The reply that finished during the drain was stored: a restarted server continues from it.
    again = start_server(v7_path, data_dir, roleplay_max_reply_tokens="8")
    try:
        loaded = httpx.post(f"{again.url}/characters/load", **form(chat), timeout=30).json()
        assert loaded["code"] == 200, loaded
        assert loaded["data"]["chat"][-1] == ["讲个故事", reply]
        nxt = httpx.post(
            f"{again.url}/chat/reply", **form({**chat, "prompt": "然后呢", **GREEDY}), timeout=60
        )
        assert reply_frames(nxt.text)
    finally:
        assert again.stop() == 0
    figure(
        f"SIGTERM drain: 2 streams in flight ({generated} OpenAI deltas, 1 role-play reply) finished, "
        f"new client {probe}, exit 0, 0 lost"
    )


def test_sigterm_past_the_drain_timeout_ends_streams_in_band(
    v7_path: Path, tmp_path: Path, figure: Callable[[str], None]
) -> None:
    live = start_server(v7_path, tmp_path / "data", drain_timeout_s="1", max_new_tokens="1000000")
    stream = openai_stream(live, 1000000)  # never ends by itself
    stream.start()
    assert stream.started.wait(60)
    live.proc.send_signal(signal.SIGTERM)
    probe = probe_after_sigterm(live)
    chunks = sse_data(stream.result())
    assert chunks[-1] == "[DONE]"
    last = json.loads(chunks[-2])
    assert last["error"] == {
        "message": "server shutting down",
        "type": "server_error",
        "param": None,
        "code": "model_not_ready",
    }, last
    assert live.proc.wait(timeout=60) == 0, log_tail(live.log)
    figure(
        f"SIGTERM past drain_timeout_s=1: endless stream ended in-band + [DONE], new client {probe}, exit 0"
    )
