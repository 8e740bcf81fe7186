"""Live servers for the client-library tests (tests/support/live.py), one per module.

Each fixture starts its own server (own data dir, own settings from `RWKV_GATEWAY_*` variables), waits
for `/readyz`, and stops it with SIGTERM at teardown.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

from support import wait_for_free_port
from support.live import CLI, LiveServer, live_server

#: The port the rwkv-api SDK's own suite hard-codes (http://localhost:8000).
SDK_PORT = 8000
#: The demo model the SDK-suite server writes and serves (see Settings.demo_layers / demo_embd).
SDK_DEMO_SIZE = {"demo_layers": "4", "demo_embd": "256"}
#: How long the suite waits for that port to be free before it fails.
SDK_PORT_WAIT_S = 120.0


@pytest.fixture(scope="module")
def sdk_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`python -m rwkv_gateway serve` on 127.0.0.1:8000 with no model configured (the demo model),
    none of this environment's RWKV_GATEWAY_* settings, and a 4x256 demo model."""
    # Another run's server may still be letting go of the port: wait for it, then fail (never skip).
    wait_for_free_port(
        SDK_PORT, SDK_PORT_WAIT_S, f"the rwkv-api suite only talks to http://localhost:{SDK_PORT}"
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
