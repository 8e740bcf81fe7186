"""Live servers for the fault tests: `python -m rwkv_gateway serve` as a subprocess whose process the
test controls (SIGTERM, kill -9, restart on the same data dir, its RSS), plus the role-play form client.

Unlike tests/clients/conftest.py (one server per module, stopped at teardown), these tests stop and
restart servers themselves, so the helper hands back the process.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
from fastapi import FastAPI

from rwkv_gateway.settings import Settings

CLI = [sys.executable, "-m", "rwkv_gateway"]
_JS_SAFE = "-_.!~*'()"


@dataclass(slots=True)
class App:
    """A started app (real lifespan, engine on the tiny v7 checkpoint, SQLite) and a client on it."""

    app: FastAPI
    client: httpx.AsyncClient
    settings: Settings


AppFactory = Callable[..., Awaitable[App]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def log_tail(log: Path, lines: int = 40) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass
class Live:
    proc: subprocess.Popen[bytes]
    port: int
    data_dir: Path
    log: Path
    model: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def readyz(self) -> httpx.Response:
        return httpx.get(f"{self.url}/readyz", timeout=10)

    def rss_bytes(self) -> int:
        """Resident memory of the server process (Linux /proc)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS line")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)
            raise AssertionError(f"server did not exit within {timeout}s:\n{log_tail(self.log)}") from None


#: Every server started, so a failing test leaves no process behind (see conftest.py).
_started: list[Live] = []


def kill_leftovers() -> None:
    while _started:
        live = _started.pop()
        if live.proc.poll() is None:
            live.proc.kill()
        live.proc.wait(timeout=30)


def start(model: Path, data_dir: Path, **settings: str) -> Live:
    """Start a server (settings become RWKV_GATEWAY_<NAME> variables) and wait for /readyz 200."""
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {**os.environ, **{f"RWKV_GATEWAY_{k.upper()}": v for k, v in settings.items()}}
    log = data_dir / f"server-{port}.log"
    cmd = [*CLI, "serve", "--model", str(model), "--data-dir", str(data_dir), "--port", str(port)]
    with log.open("w") as log_file:
        proc = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    live = Live(proc, port, data_dir, log, model.stem)
    deadline = time.monotonic() + 120
    _started.append(live)
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{log_tail(log)}")
        if time.monotonic() > deadline:
            live.stop(signal.SIGKILL)
            raise AssertionError(f"server never became ready:\n{log_tail(log)}")
        try:
            if live.readyz().status_code == 200:
                return live
        except httpx.TransportError:
            pass
        time.sleep(0.1)


def form(fields: dict[str, Any]) -> dict[str, Any]:
    """httpx keyword arguments posting `fields` as the role-play UI does (encodeURIComponent)."""
    body = "&".join(
        f"{quote(str(k), safe=_JS_SAFE)}={quote(str(v), safe=_JS_SAFE)}" for k, v in fields.items()
    )
    return {"content": body.encode(), "headers": {"Content-Type": "application/x-www-form-urlencoded"}}


def reply_frames(text: str) -> list[str]:
    """The cumulative texts of a role-play reply stream (`\\n\\ndata: <whole reply so far>` chunks)."""
    return text.split("\n\ndata: ")[1:]


#: The character the fault tests chat with (the UI's field set).
CARD = {
    "bot": "小雪",
    "user": "哥哥",
    "greeting": "你好, 来聊天吧。",
    "bot_persona": "你扮演{{char}}, 是{{user}}的邻居。",
    "example_message": "",
    "use_qa": "",
    "avatar": "",
}
GREEDY = {"tau": "3", "rate": "0.1", "min_p": "0.05", "temperature": "0", "presence_penalty": "0.2"}
