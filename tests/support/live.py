"""A live server: `python -m rwkv_gateway serve` as a subprocess on a free port, ready when `/readyz`
answers 200.

`start_server` returns the `LiveServer`, whose process the caller owns (the fault tests send SIGTERM,
kill -9 and restart on the same data dir); `live_server` is the context-manager form that stops it
with SIGTERM at the end. The server's log goes to a file in its data dir and is shown when it fails to
start.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from support.net import free_port

if TYPE_CHECKING:
    import openai

CLI = [sys.executable, "-m", "rwkv_gateway"]
#: With no keys configured, any Bearer value is accepted.
API_KEY = "anything"


def log_tail(log: Path, lines: int = 40) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass
class LiveServer:
    proc: subprocess.Popen[bytes]
    port: int
    data_dir: Path
    log: Path
    model_name: str
    #: The key clients send by default: any value while the server has no keys.
    api_key: str = API_KEY

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def v1(self) -> str:
        return f"{self.url}/v1"

    def readyz(self) -> dict[str, Any]:
        body: dict[str, Any] = httpx.get(f"{self.url}/readyz", timeout=10).json()
        return body

    def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 30.0, what: str = "condition"
    ) -> dict[str, Any]:
        """Poll /readyz until `predicate(body)` holds; the last body is returned (or the test fails)."""
        deadline = time.monotonic() + timeout
        body = self.readyz()
        while not predicate(body):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}; /readyz says {body}")
            time.sleep(0.05)
            body = self.readyz()
        return body

    def openai(self, api_key: str | None = None) -> openai.OpenAI:
        import openai

        key = self.api_key if api_key is None else api_key
        return openai.OpenAI(base_url=self.v1, api_key=key, max_retries=0, timeout=120)

    def async_openai(self, api_key: str | None = None) -> openai.AsyncOpenAI:
        import openai

        key = self.api_key if api_key is None else api_key
        return openai.AsyncOpenAI(base_url=self.v1, api_key=key, max_retries=0, timeout=120)

    def rss_bytes(self) -> int:
        """Resident memory of the server process (Linux /proc)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS line")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        """Send `sig` and wait for the exit status (killed, and the test failed, past `timeout`)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)
            raise AssertionError(f"server did not exit within {timeout}s:\n{log_tail(self.log)}") from None


#: Every server started, so a failing test leaves no process behind (`kill_leftovers`).
_started: list[LiveServer] = []


def kill_leftovers() -> None:
    while _started:
        live = _started.pop()
        if live.proc.poll() is None:
            live.proc.kill()
        live.proc.wait(timeout=30)


def start_server(
    model: Path | None,
    data_dir: Path,
    *,
    api_key: str = API_KEY,
    port: int | None = None,
    env: dict[str, str] | None = None,
    ready_s: float = 120,
    **settings: str,
) -> LiveServer:
    """Start `rwkv_gateway serve` (on the demo model when `model` is None) on `port` (default: a free
    one), in `env` (default: this process's environment), and wait for /readyz 200; `settings` become
    RWKV_GATEWAY_<NAME> variables."""
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port() if port is None else port
    base = dict(os.environ) if env is None else env
    env = {**base, **{f"RWKV_GATEWAY_{k.upper()}": v for k, v in settings.items()}}
    log = data_dir / f"server-{port}.log"
    cmd = [*CLI, "serve", "--data-dir", str(data_dir), "--port", str(port)]
    if model is not None:
        cmd += ["--model", str(model)]
    with log.open("w") as log_file:
        proc = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    name = model.stem if model is not None else "rwkv-demo"
    live = LiveServer(proc, port, data_dir, log, name, api_key)
    _started.append(live)
    deadline = time.monotonic() + ready_s
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{log_tail(log)}")
        if time.monotonic() > deadline:
            live.stop(signal.SIGKILL)
            raise AssertionError(f"server never became ready:\n{log_tail(log)}")
        try:
            if httpx.get(f"{live.url}/readyz", timeout=2).status_code == 200:
                return live
        except httpx.TransportError:
            pass
        time.sleep(0.1)


@contextlib.contextmanager
def live_server(model: Path | None, data_dir: Path, **kwargs: Any) -> Iterator[LiveServer]:
    """`start_server(...)` for the length of a `with` block, stopped with SIGTERM at its end."""
    live = start_server(model, data_dir, **kwargs)
    try:
        yield live
    finally:
        with contextlib.suppress(AssertionError):
            live.stop()
        if live in _started:
            _started.remove(live)
