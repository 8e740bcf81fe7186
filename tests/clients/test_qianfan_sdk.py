"""The official `qianfan` SDK (0.4.12.3) against a live `rwkv_gateway serve` process, pointed at it
with the base-URL variables of docs/wenxin.md#using-it (`QIANFAN_BASE_URL`,
`QIANFAN_CONSOLE_API_BASE_URL`) and `endpoint="rwkv"` (the configured api_name).

Both ways the SDK authenticates: OAuth (`ak`/`sk`: it fetches a token from /oauth/2.0/token itself,
and refreshes it on code 110) and IAM (`access_key`/`secret_key`: every request carries a bce-auth-v1
signature). Sync and async, streaming and not, multi-turn, the error codes the SDK acts on, and a
client disconnect ending the generation. The model is a tiny random-weight RWKV-7, so replies are
noise made of real tokens; `top_k=1` makes them deterministic (greedy).

qianfan builds its global config once, from the environment, on first use; each test sets its
variables and drops that cached object so the next call reads them again (monkeypatch restores it).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import qianfan
import uvicorn
from qianfan import errors as qf_errors

from rwkv_gateway.app import create_app
from rwkv_gateway.engine import admission as admission_mod
from rwkv_gateway.engine.sampler import Sampler
from rwkv_gateway.settings import Settings
from support import free_port

if TYPE_CHECKING:
    from conftest import BaiduServer  # tests/clients/conftest.py

ENDPOINT = "rwkv"
CHAT = "/rpc/2.0/ai_custom/v1/wenxinworkshop/chat/rwkv"
HELLO = [{"role": "user", "content": "\u4f60\u597d\uff0cRWKV"}]  # "ni hao,RWKV" with a fullwidth comma
GREEDY: dict[str, Any] = {"top_k": 1, "max_output_tokens": 16}


def point_sdk_at(monkeypatch: pytest.MonkeyPatch, url: str, cache_dir: Path, **extra: str) -> None:
    """Set the SDK's variables (only these) and make it read them again."""
    for name in list(os.environ):
        if name.startswith("QIANFAN_"):
            monkeypatch.delenv(name)
    env = {
        "QIANFAN_BASE_URL": url,  # inference and /oauth/2.0/token
        "QIANFAN_CONSOLE_API_BASE_URL": url,  # model-list lookups stay local
        "QIANFAN_DISABLE_CACHE": "true",
        "QIANFAN_CACHE_DIR": str(cache_dir),
        # Codes the SDK retries (336100 here) should fail at once in a test.
        "QIANFAN_LLM_API_RETRY_COUNT": "1",
        # Short-lived tokens: let the SDK refresh on 110/111 however recently it last did.
        "QIANFAN_ACCESS_TOKEN_REFRESH_MIN_INTERVAL": "0",
        **extra,
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(importlib.import_module("qianfan.config"), "_GLOBAL_CONFIG", None)


@pytest.fixture
def srv(baidu_server: BaiduServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> BaiduServer:
    point_sdk_at(monkeypatch, baidu_server.url, tmp_path / "qianfan-cache")
    return baidu_server


def oauth_client(srv: BaiduServer | InProcessServer, **kwargs: Any) -> qianfan.ChatCompletion:
    return qianfan.ChatCompletion(ak=srv.api_key, sk=srv.secret_key, **kwargs)


def iam_client(srv: BaiduServer, **kwargs: Any) -> qianfan.ChatCompletion:
    return qianfan.ChatCompletion(access_key=srv.api_key, secret_key=srv.secret_key, **kwargs)


def raw_token(srv: BaiduServer) -> str:
    resp = httpx.post(
        f"{srv.url}/oauth/2.0/token",
        params={
            "grant_type": "client_credentials",
            "client_id": srv.api_key,
            "client_secret": srv.secret_key,
        },
        timeout=30,
    )
    token: str = resp.json()["access_token"]
    return token


def raw_greedy(srv: BaiduServer, messages: list[dict[str, str]] = HELLO, **fields: Any) -> dict[str, Any]:
    """The same request over plain HTTP (its parity with the engine is checked in tests/api/wenxin)."""
    resp = httpx.post(
        f"{srv.url}{CHAT}",
        params={"access_token": raw_token(srv)},
        json={"messages": messages, **GREEDY, **fields},
        timeout=120,
    )
    body: dict[str, Any] = resp.json()
    assert "error_code" not in body, body
    return body


def check_chunks(chunks: list[dict[str, Any]], whole: dict[str, Any]) -> None:
    assert len(chunks) >= 1
    assert [c["sentence_id"] for c in chunks] == list(range(len(chunks)))
    assert [c["is_end"] for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert "".join(c["result"] for c in chunks) == whole["result"]
    assert chunks[-1]["usage"]["total_tokens"] == whole["usage"]["total_tokens"]
    assert chunks[-1]["is_truncated"] == whole["is_truncated"]


# ---------------------------------------------------------------------------- OAuth (ak/sk) mode


def test_oauth_mode_sync(srv: BaiduServer) -> None:
    expected = raw_greedy(srv)
    resp = oauth_client(srv).do(endpoint=ENDPOINT, messages=HELLO, **GREEDY)
    assert resp.code == 200
    body = resp.body
    assert body["result"] == expected["result"]
    assert body["usage"] == expected["usage"]
    assert body["object"] == "chat.completion" and body["id"].startswith("as-")
    assert body["is_truncated"] is True and body["need_clear_history"] is False


def test_oauth_mode_sync_stream(srv: BaiduServer) -> None:
    expected = raw_greedy(srv, max_output_tokens=40)
    stream = oauth_client(srv).do(
        endpoint=ENDPOINT, messages=HELLO, stream=True, **{**GREEDY, "max_output_tokens": 40}
    )
    check_chunks([chunk.body for chunk in stream], expected)


@pytest.mark.parametrize("mode", ["oauth", "iam"])
async def test_async_and_async_stream_in_both_auth_modes(srv: BaiduServer, mode: str) -> None:
    expected = await asyncio.to_thread(raw_greedy, srv, HELLO, max_output_tokens=40)
    client = oauth_client(srv) if mode == "oauth" else iam_client(srv)
    resp = await client.ado(endpoint=ENDPOINT, messages=HELLO, **{**GREEDY, "max_output_tokens": 40})
    assert resp.body["result"] == expected["result"]
    stream = await client.ado(
        endpoint=ENDPOINT, messages=HELLO, stream=True, **{**GREEDY, "max_output_tokens": 40}
    )
    check_chunks([chunk.body async for chunk in stream], expected)


def test_oauth_credentials_from_the_environment(
    baidu_server: BaiduServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    point_sdk_at(
        monkeypatch,
        baidu_server.url,
        tmp_path / "cache",
        QIANFAN_AK=baidu_server.api_key,
        QIANFAN_SK=baidu_server.secret_key,
    )
    resp = qianfan.ChatCompletion().do(endpoint=ENDPOINT, messages=HELLO, **GREEDY)
    assert resp.body["result"] == raw_greedy(baidu_server)["result"]


def test_custom_endpoint_mode_drops_the_chat_segment(
    baidu_server: BaiduServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # QIANFAN_USE_CUSTOM_ENDPOINT=true: the SDK appends the endpoint as given to the prefix, so "/rwkv"
    # posts to .../wenxinworkshop/rwkv (no "/chat/").
    point_sdk_at(monkeypatch, baidu_server.url, tmp_path / "cache", QIANFAN_USE_CUSTOM_ENDPOINT="true")
    resp = oauth_client(baidu_server).do(endpoint="/" + ENDPOINT, messages=HELLO, **GREEDY)
    assert resp.body["result"] == raw_greedy(baidu_server)["result"]
    assert "/wenxinworkshop/rwkv" in resp.request.url and "/chat/" not in resp.request.url


def test_sdk_refreshes_an_invalid_token_with_its_ak_sk(srv: BaiduServer) -> None:
    # A stale token (code 110) with AK/SK at hand: the SDK fetches a new one and retries once.
    client = oauth_client(srv, access_token="24.00000000000000000000000000000000.2592000.1.0-1")
    resp = client.do(endpoint=ENDPOINT, messages=HELLO, **GREEDY)
    assert resp.body["result"] == raw_greedy(srv)["result"]


def test_a_bare_invalid_token_is_access_token_expired(srv: BaiduServer) -> None:
    client = qianfan.ChatCompletion(access_token="24.00000000000000000000000000000000.2592000.1.0-1")
    with pytest.raises(qf_errors.AccessTokenExpiredError):
        client.do(endpoint=ENDPOINT, messages=HELLO, **GREEDY)
    # A live token given bare works.
    resp = qianfan.ChatCompletion(access_token=raw_token(srv)).do(endpoint=ENDPOINT, messages=HELLO, **GREEDY)
    assert resp.body["result"] == raw_greedy(srv)["result"]


def test_wrong_secret_key_is_an_auth_error(srv: BaiduServer) -> None:
    with pytest.raises(qf_errors.AuthError):
        qianfan.ChatCompletion(ak=srv.api_key, sk="x" * 32).do(endpoint=ENDPOINT, messages=HELLO, **GREEDY)


# ---------------------------------------------------------------------------- IAM (access_key, secret_key)


def test_iam_mode_sync_and_stream(srv: BaiduServer) -> None:
    expected = raw_greedy(srv, max_output_tokens=40)
    client = iam_client(srv)
    resp = client.do(endpoint=ENDPOINT, messages=HELLO, **{**GREEDY, "max_output_tokens": 40})
    assert resp.body["result"] == expected["result"]
    stream = client.do(endpoint=ENDPOINT, messages=HELLO, stream=True, **{**GREEDY, "max_output_tokens": 40})
    check_chunks([chunk.body for chunk in stream], expected)


def test_iam_credentials_from_the_environment_with_the_console_lookup(
    baidu_server: BaiduServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Global IAM credentials make the SDK ask the console's model list first (answered locally).
    point_sdk_at(
        monkeypatch,
        baidu_server.url,
        tmp_path / "cache",
        QIANFAN_ACCESS_KEY=baidu_server.api_key,
        QIANFAN_SECRET_KEY=baidu_server.secret_key,
    )
    resp = qianfan.ChatCompletion().do(endpoint=ENDPOINT, messages=HELLO, **GREEDY)
    assert resp.body["result"] == raw_greedy(baidu_server)["result"]


def test_wrong_iam_secret_is_api_error_14(srv: BaiduServer) -> None:
    client = qianfan.ChatCompletion(access_key=srv.api_key, secret_key="x" * 32)
    with pytest.raises(qf_errors.APIError) as caught:
        client.do(endpoint=ENDPOINT, messages=HELLO, **GREEDY)
    assert caught.value.error_code == 14


# ---------------------------------------------------------------------------- multi-turn and errors


@pytest.mark.parametrize("mode", ["oauth", "iam"])
def test_multi_turn_conversation(srv: BaiduServer, mode: str) -> None:
    client = oauth_client(srv) if mode == "oauth" else iam_client(srv)
    history: list[dict[str, str]] = []
    replies = []
    for question in ["What is RWKV?", "Is it an RNN?", "Thanks, bye."]:
        history.append({"role": "user", "content": question})
        resp = client.do(endpoint=ENDPOINT, messages=list(history), system="Be brief.", **GREEDY)
        reply = resp.body["result"]
        assert reply == raw_greedy(srv, history, system="Be brief.")["result"]
        replies.append(reply)
        history.append({"role": "assistant", "content": reply})
    assert len(history) == 6 and all(replies)


def test_parameter_errors_and_unknown_endpoint_are_api_errors(srv: BaiduServer) -> None:
    client = oauth_client(srv)
    cases: list[tuple[dict[str, Any], int]] = [
        ({"endpoint": "no_such_api"}, 336005),
        ({"endpoint": ENDPOINT, "temperature": 0}, 336003),
        ({"endpoint": ENDPOINT, "penalty_score": 3.0}, 336003),
        ({"endpoint": ENDPOINT, "messages": [*HELLO, {"role": "assistant", "content": "hi"}]}, 336006),
    ]
    for kwargs, code in cases:
        kwargs = {"messages": HELLO, **kwargs}
        with pytest.raises(qf_errors.APIError) as caught:
            client.do(**kwargs)
        assert caught.value.error_code == code, kwargs
        with pytest.raises(qf_errors.APIError) as caught:
            list(client.do(stream=True, **kwargs))
        assert caught.value.error_code == code, kwargs


# ---------------------------------------------------------------------------- busy and disconnects


@contextlib.contextmanager
def open_stream(srv: BaiduServer, token: str) -> Iterator[httpx.Response]:
    """A raw stream that would run for many minutes; closing it disconnects."""
    body = {"messages": HELLO, "max_output_tokens": 500_000, "stream": True}
    with (
        httpx.Client(timeout=60) as client,
        client.stream("POST", f"{srv.url}{CHAT}", params={"access_token": token}, json=body) as resp,
    ):
        assert resp.status_code == 200
        yield resp


def test_queue_full_is_the_code_the_sdk_retries(
    baidu_busy_server: BaiduServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    srv = baidu_busy_server
    point_sdk_at(monkeypatch, srv.url, tmp_path / "cache")
    live = srv.server
    token = raw_token(srv)
    with open_stream(srv, token):
        live.wait_for(lambda s: s["active_sequences"] == 1, what="the first stream to run")
        with open_stream(srv, token):
            live.wait_for(lambda s: s["queue_depth"] == 1, what="the second stream to wait")
            with pytest.raises(qf_errors.APIError) as caught:
                oauth_client(srv).do(endpoint=ENDPOINT, messages=HELLO, **GREEDY)
            assert caught.value.error_code == 336100
            assert 336100 in qianfan.get_config().LLM_API_RETRY_ERR_CODES  # one the SDK retries
            resp = httpx.post(f"{srv.url}{CHAT}", params={"access_token": token}, json={"messages": HELLO})
            assert resp.json() == {"error_code": 336100, "error_msg": "try again later"}
    live.wait_for(lambda s: s["active_sequences"] == 0 and s["queue_depth"] == 0, what="an idle engine")
    resp = oauth_client(srv).do(endpoint=ENDPOINT, messages=HELLO, **GREEDY)
    assert resp.body["usage"]["completion_tokens"] == GREEDY["max_output_tokens"]


def test_client_disconnect_cancels_the_stream(srv: BaiduServer) -> None:
    live = srv.server
    live.wait_for(lambda s: s["active_sequences"] == 0, what="an idle engine")
    with open_stream(srv, raw_token(srv)) as resp:
        lines = resp.iter_lines()  # kept referenced: a dropped line iterator closes the body
        first = next(lines)
        assert first.startswith("data: {") and "error_code" not in first, first
        assert live.readyz()["active_sequences"] == 1, "the stream should still be generating"
        lines.close()  # closing the body iterator drops the connection mid-stream
    live.wait_for(lambda s: s["active_sequences"] == 0, timeout=30, what="the cancelled sequence to go")


def test_client_disconnect_cancels_a_plain_request(srv: BaiduServer) -> None:
    live = srv.server
    live.wait_for(lambda s: s["active_sequences"] == 0, what="an idle engine")
    body = {"messages": HELLO, "max_output_tokens": 500_000}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{srv.url}{CHAT}", params={"access_token": raw_token(srv)}, json=body, timeout=2)
    live.wait_for(lambda s: s["active_sequences"] == 0, timeout=30, what="the cancelled sequence to go")


# ---------------------------------------------------------------------------- a failure mid-stream

FAULT_PENALTY = 1.234  # marks the request the fault-injecting sampler acts on


@dataclass(frozen=True)
class InProcessServer:
    url: str
    api_key: str
    secret_key: str


@contextlib.contextmanager
def in_process_server(model: Path, data_dir: Path) -> Iterator[InProcessServer]:
    """The real app under uvicorn in a thread of this process, so a fault can be injected into its
    engine; its key pair is made with the CLI first, as for the live servers."""
    made = subprocess.run(
        [
            sys.executable,
            "-m",
            "rwkv_gateway",
            "keys",
            "create",
            "--kind",
            "baidu",
            "--json",
            "--data-dir",
            str(data_dir),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    keys = json.loads(made.stdout)
    port = free_port()
    app = create_app(Settings(model=model, data_dir=data_dir))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert thread.is_alive() and time.monotonic() < deadline, "the in-process server did not start"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            time.sleep(0.1)
        yield InProcessServer(url, keys["api_key"], keys["secret_key"])
    finally:
        server.should_exit = True
        thread.join(60)


def test_a_failure_after_the_first_chunk_is_an_api_error_after_the_chunks(
    v7_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class FaultySampler(Sampler):  # fault injection: the 40th token of a marked request fails
        calls = 0

        def sample(self, logits):  # type: ignore[no-untyped-def]
            if self.params.repetition_penalty == FAULT_PENALTY:
                self.calls += 1
                if self.calls > 40:
                    raise RuntimeError("injected sampling fault")
            return super().sample(logits)

    monkeypatch.setattr(admission_mod, "Sampler", FaultySampler)
    with in_process_server(v7_path, tmp_path / "data") as srv:
        point_sdk_at(monkeypatch, srv.url, tmp_path / "cache")
        client = oauth_client(srv)
        kwargs: dict[str, Any] = {"endpoint": ENDPOINT, "messages": HELLO, "top_k": 1}
        kwargs |= {"penalty_score": FAULT_PENALTY, "max_output_tokens": 100}
        chunks: list[dict[str, Any]] = []
        with pytest.raises(qf_errors.APIError) as caught:
            for chunk in client.do(stream=True, **kwargs):
                chunks.append(chunk.body)
        assert caught.value.error_code == 336000 and "injected sampling fault" in caught.value.error_msg
        assert chunks and all(c["is_end"] is False for c in chunks)
        assert [c["sentence_id"] for c in chunks] == list(range(len(chunks)))

        async def stream_async() -> list[dict[str, Any]]:
            got: list[dict[str, Any]] = []
            with pytest.raises(qf_errors.APIError) as caught:
                async for chunk in await client.ado(stream=True, **kwargs):
                    got.append(chunk.body)
            assert caught.value.error_code == 336000
            return got

        assert [c["result"] for c in asyncio.run(stream_async())] == [c["result"] for c in chunks]
        with pytest.raises(qf_errors.APIError) as caught:
            client.do(**kwargs)
        assert caught.value.error_code == 336000
        resp = client.do(endpoint=ENDPOINT, messages=HELLO, top_k=1, max_output_tokens=3)  # others are fine
        assert resp.body["usage"]["completion_tokens"] == 3
