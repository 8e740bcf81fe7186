"""Live servers for the client-library tests: `python -m rwkv_gateway serve` as a subprocess on a free port.

Each fixture starts its own server (own data dir, own settings from `RWKV_GATEWAY_*` variables), waits
for `/readyz`, and stops it with SIGTERM at teardown. The server's log goes to a file in its data dir
and is shown when it fails to start.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

CLI = [sys.executable, "-m", "rwkv_gateway"]
API_KEY = "anything"  # no keys configured: any Bearer value is accepted


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class LiveServer:
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
        resp = httpx.get(f"{self.url}/readyz", timeout=5)
        body: dict[str, Any] = resp.json()
        return body

    def openai(self, api_key: str | None = None) -> openai.OpenAI:
        key = self.api_key if api_key is None else api_key
        return openai.OpenAI(base_url=self.v1, api_key=key, max_retries=0, timeout=120)

    def async_openai(self, api_key: str | None = None) -> openai.AsyncOpenAI:
        key = self.api_key if api_key is None else api_key
        return openai.AsyncOpenAI(base_url=self.v1, api_key=key, max_retries=0, timeout=120)

    def wait_for(self, predicate: Any, timeout: float = 30.0, what: str = "condition") -> dict[str, Any]:
        """Poll /readyz until `predicate(body)` holds; the last body is returned (or the test fails)."""
        deadline = time.monotonic() + timeout
        body = self.readyz()
        while not predicate(body):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}; /readyz says {body}")
            time.sleep(0.05)
            body = self.readyz()
        return body


def _log_tail(log: Path, lines: int = 40) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@contextlib.contextmanager
def live_server(
    model: Path | None,
    data_dir: Path,
    *,
    api_key: str = API_KEY,
    port: int | None = None,
    env: dict[str, str] | None = None,
    ready_s: float = 120,
    **settings: str,
) -> Iterator[LiveServer]:
    """Start `rwkv_gateway serve` (on the demo model when `model` is None) on `port` (default: a
    free one), in `env` (default: this process's environment); `settings` become RWKV_GATEWAY_<NAME>
    variables."""
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port() if port is None else port
    base = dict(os.environ) if env is None else env
    env = {**base, **{f"RWKV_GATEWAY_{k.upper()}": v for k, v in settings.items()}}
    log = data_dir / "server.log"
    cmd = [*CLI, "serve", "--data-dir", str(data_dir), "--port", str(port)]
    if model is not None:
        cmd += ["--model", str(model)]
    with log.open("w") as log_file:
        proc = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    name = model.stem if model is not None else "rwkv-demo"
    server = LiveServer(port=port, data_dir=data_dir, log=log, model_name=name, api_key=api_key)
    try:
        deadline = time.monotonic() + ready_s
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"server exited with {proc.returncode}:\n{_log_tail(log)}")
            if time.monotonic() > deadline:
                raise AssertionError(f"server never became ready:\n{_log_tail(log)}")
            try:
                if httpx.get(f"{server.url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


#: The port the rwkv-api SDK's own suite hard-codes (http://localhost:8000).
SDK_PORT = 8000
#: The demo model the SDK-suite server writes and serves (see Settings.demo_layers / demo_embd).
SDK_DEMO_SIZE = {"demo_layers": "4", "demo_embd": "256"}


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture(scope="module")
def sdk_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`python -m rwkv_gateway serve` on 127.0.0.1:8000 with no model configured (the demo model),
    none of this environment's RWKV_GATEWAY_* settings, and a 4x256 demo model."""
    if not _port_free(SDK_PORT):
        pytest.skip(
            f"port {SDK_PORT} is in use; the rwkv-api suite only talks to http://localhost:{SDK_PORT}"
        )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RWKV_GATEWAY_")}
    data_dir = tmp_path_factory.mktemp("rwkv-api-server")
    with live_server(None, data_dir, port=SDK_PORT, env=env, ready_s=180, **SDK_DEMO_SIZE) as srv:
        yield srv.url


@pytest.fixture(scope="module")
def server(v7_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """The default server. A large max_new_tokens lets a test start a stream that never ends by itself."""
    with live_server(v7_path, tmp_path_factory.mktemp("openai-server"), max_new_tokens="1000000") as srv:
        yield srv


@pytest.fixture(scope="module")
def busy_server(v7_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """One batch slot and one queue place (a third concurrent request is turned away); short prompts."""
    with live_server(
        v7_path,
        tmp_path_factory.mktemp("openai-busy-server"),
        queue_size="1",
        max_batch_size="1",
        max_new_tokens="1000000",
        max_prompt_tokens="256",
    ) as srv:
        yield srv


@pytest.fixture(scope="module")
def keyed_server(v7_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """A server whose database holds an OpenAI key (made with the CLI before it starts)."""
    data_dir = tmp_path_factory.mktemp("openai-keyed-server")
    made = subprocess.run(
        [*CLI, "keys", "create", "--kind", "openai", "--json", "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert made.returncode == 0, made.stderr
    key = json.loads(made.stdout)["api_key"]
    assert isinstance(key, str) and key
    with live_server(v7_path, data_dir, api_key=key) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: LiveServer) -> Iterator[openai.OpenAI]:
    with server.openai() as c:
        yield c


# ---------------------------------------------------------------------------- Baidu (qianfan SDK)


@dataclass(frozen=True)
class BaiduServer:
    """A live server and the Baidu AK/SK pair its database holds (made with the CLI before it starts)."""

    server: LiveServer
    api_key: str
    secret_key: str

    @property
    def url(self) -> str:
        return self.server.url


@contextlib.contextmanager
def baidu_live_server(model: Path, data_dir: Path, **settings: str) -> Iterator[BaiduServer]:
    data_dir.mkdir(parents=True, exist_ok=True)
    made = subprocess.run(
        [*CLI, "keys", "create", "--kind", "baidu", "--json", "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert made.returncode == 0, made.stderr
    keys = json.loads(made.stdout)
    assert set(keys) == {"api_key", "secret_key"}, keys
    with live_server(model, data_dir, **settings) as srv:
        yield BaiduServer(srv, keys["api_key"], keys["secret_key"])


@pytest.fixture(scope="module")
def baidu_server(v7_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BaiduServer]:
    """A server with a Baidu key pair; a large max_new_tokens lets a test start an endless stream."""
    data_dir = tmp_path_factory.mktemp("wenxin-server")
    with baidu_live_server(v7_path, data_dir, max_new_tokens="1000000") as srv:
        yield srv


@pytest.fixture(scope="module")
def baidu_busy_server(v7_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BaiduServer]:
    """A server with a Baidu key pair, one batch slot and one queue place."""
    with baidu_live_server(
        v7_path,
        tmp_path_factory.mktemp("wenxin-busy-server"),
        queue_size="1",
        max_batch_size="1",
        max_new_tokens="1000000",
    ) as srv:
        yield srv
