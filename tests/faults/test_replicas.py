"""Two replicas, as docs/deployment.md#scaling-past-one-gpu runs them: two real `rwkv-gateway serve`
processes started at the same moment on one empty PostgreSQL database and one data directory.

Both become ready (the schema is migrated once); keys made by the CLI work on both, a Baidu access
token issued by one is accepted by the other and a revocation is seen by both; a role-play login on
one ends the old token on the other; a conversation moves between them with identical greedy replies,
continued from its saved state without prefilling its history again; their guest sweepers remove an
idle guest but not one in use; and after `kill -9` of one replica in the middle of a reply, the other
serves the user's next turn from the last completed node, while the killed one's restart (its
start-up clean-up) leaves the other's writes alone and nothing is left corrupt.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from live import CARD, GREEDY, call, form, reply_frames

from rwkv_gateway.engine.states import load_snapshot
from support.live import CLI, LiveServer, log_tail, start_server
from support.postgres import PostgresServer

SETTINGS = {
    "roleplay_max_reply_tokens": "16",
    "prefill_chunk": "16",
    "roleplay_guest_ttl_s": "300",
    "roleplay_guest_sweep_s": "0.5",
}
CHAT = {"model": "tiny-v7", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
WENXIN_CHAT = "/rpc/2.0/ai_custom/v1/wenxinworkshop/chat/rwkv"


def cli(db_url: str, *args: str) -> str:
    out = subprocess.run([*CLI, *args, "--db-url", db_url], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def envelope(live: LiveServer, path: str, fields: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(httpx.post(f"{live.url}{path}", **form(fields), timeout=60).content)
    return out


def reply(live: LiveServer, chat: dict[str, str], prompt: str) -> str:
    resp = httpx.post(f"{live.url}/chat/reply", **form({**chat, "prompt": prompt, **GREEDY}), timeout=60)
    frames = reply_frames(resp.text)
    assert frames, (resp.text, log_tail(live.log))
    return frames[-1]


def metric(live: LiveServer, name: str) -> float:
    text = httpx.get(f"{live.url}/metrics", timeout=10).text
    found = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert found, name
    return float(found.group(1))


def openai_status(live: LiveServer, key: str) -> int:
    headers = {"Authorization": f"Bearer {key}"}
    return httpx.post(f"{live.v1}/chat/completions", json=CHAT, headers=headers, timeout=60).status_code


def wenxin_error(live: LiveServer, token: str) -> int | None:
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_output_tokens": 2}
    out = httpx.post(f"{live.url}{WENXIN_CHAT}?access_token={token}", json=body, timeout=60).json()
    code: int | None = out.get("error_code")
    return code


def eventually(check: Callable[[], bool], what: str, within_s: float = 30) -> None:
    deadline = time.monotonic() + within_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_two_replicas_share_one_database_and_one_data_dir(
    v7_path: Path, tmp_path: Path, postgres: PostgresServer, figure: Callable[[str], None]
) -> None:
    db_url = postgres.fresh_database()
    database = db_url.rsplit("/", 1)[1]
    shared = tmp_path / "shared"
    env = {"db_url": db_url, **SETTINGS}
    with ThreadPoolExecutor(2) as pool:  # both at the same moment, on an empty database
        a, b = pool.map(lambda _: start_server(v7_path, shared, **env), range(2))
    assert postgres.psql("SELECT count(*) FROM alembic_version", database) == "1"

    # Keys: made by the CLI, required and accepted by both; a Baidu token from one works on the other.
    key = json.loads(cli(db_url, "keys", "create", "--kind", "openai", "--json"))["api_key"]
    eventually(lambda: openai_status(a, "wrong") == openai_status(b, "wrong") == 401, "keys required")
    assert openai_status(a, key) == openai_status(b, key) == 200
    baidu = json.loads(cli(db_url, "keys", "create", "--kind", "baidu", "--json"))
    token = httpx.post(
        f"{a.url}/oauth/2.0/token?grant_type=client_credentials"
        f"&client_id={baidu['api_key']}&client_secret={baidu['secret_key']}",
        timeout=60,
    ).json()["access_token"]
    assert wenxin_error(b, token) is None and wenxin_error(a, token) is None
    cli(db_url, "keys", "revoke", baidu["api_key"])
    assert wenxin_error(b, token) == wenxin_error(a, token) == 110  # revoked: qianfan's "refresh"

    # A role-play login on one replica ends the previous token on the other.
    cli(db_url, "users", "add", "alice", "--password", "pw-123456")
    first = call(a, "/login", {"user_name": "alice", "password": "pw-123456", "token": "null"})
    alice = {"user_name": "alice", "token": first["token"]}
    assert call(b, "/characters/list", alice) is not None
    second = call(b, "/login", {"user_name": "alice", "password": "pw-123456", "token": "null"})
    assert envelope(a, "/characters/list", alice)["code"] == 403
    alice["token"] = second["token"]
    assert call(a, "/characters/list", alice) is not None

    # A conversation moves between replicas: same greedy replies, no re-prefill of its history.
    guest = call(a, "/login/tmp", {"token": "null"})
    chat = {"user_name": guest["user_name"], "token": guest["token"], "character_name": CARD["bot"]}
    call(a, "/characters/save", {**chat, **CARD})
    call(a, "/characters/load", chat)
    reply(a, chat, "你好")
    reply(a, chat, "今天做什么")
    history = call(a, "/characters/load", chat)["chat"]
    before = call(b, "/debug/token", chat)
    assert before == call(a, "/debug/token", chat)
    prefilled = metric(b, "rwkv_gateway_engine_prefill_tokens_total")
    moved = reply(b, chat, "去散步吧")
    prefilled = metric(b, "rwkv_gateway_engine_prefill_tokens_total") - prefilled
    after = call(b, "/debug/token", chat)
    assert 0 < prefilled <= after["token_count"] - before["token_count"] < before["token_count"]
    call(b, "/chat/back", {**chat, "log_index": str(len(history) - 1)})
    assert call(a, "/characters/load", chat)["chat"] == history
    assert reply(a, chat, "去散步吧") == moved

    # The sweepers (every 0.5 s on both) remove an idle guest, never one in use.
    idle = call(b, "/login/tmp", {"token": "null"})["user_name"]
    backdate = f"UPDATE users SET last_seen_at = now() - interval '2 days' WHERE name = '{idle}'"
    postgres.psql(backdate, database)
    count = f"SELECT count(*) FROM users WHERE name IN ('{idle}', '{guest['user_name']}')"
    eventually(lambda: postgres.psql(count, database) == "1", "the idle guest to be swept")
    assert call(b, "/characters/load", chat)["chat"][-1][1] == moved

    # kill -9 of B mid-reply: A serves the next turn from the last completed node.
    known = call(a, "/characters/load", chat)["chat"]
    gate = threading.Event()

    def stream() -> None:
        fields = {**chat, "prompt": "再说一遍", **GREEDY}
        try:
            with httpx.stream("POST", f"{b.url}/chat/reply", **form(fields), timeout=60) as resp:
                for _ in resp.iter_raw():
                    gate.set()
        except httpx.TransportError:
            pass  # killed under it
        finally:
            gate.set()

    streamer = threading.Thread(target=stream, daemon=True)
    streamer.start()
    assert gate.wait(60)
    assert b.stop(signal.SIGKILL) == -signal.SIGKILL
    streamer.join(60)
    landed = call(a, "/characters/load", chat)["chat"]
    assert landed == known or (landed[:-1] == known and landed[-1][0] == "再说一遍"), landed
    next_turn = reply(a, chat, "继续")
    assert call(a, "/characters/load", chat)["chat"][-1] == ["继续", next_turn]

    # B starts again (its start-up clean-up runs) while A writes the states of another turn.
    writing = threading.Thread(target=lambda: reply(a, chat, "然后呢"), daemon=True)
    writing.start()
    b = start_server(v7_path, shared, **env)
    writing.join(60)
    final = call(b, "/characters/load", chat)["chat"]
    assert final[-1][0] == "然后呢" and final[-1][1]
    assert reply(b, chat, "晚安")
    assert a.stop() == 0 and b.stop() == 0
    states = shared / "states"
    assert [p for p in states.rglob("*") if p.is_file() and not p.name.endswith(".state")] == []
    files = list(states.rglob("*.state"))
    for path in files:
        load_snapshot(path)  # raises StateMismatch on a torn or corrupt file
    figure(
        f"replicas: 2 started together on one empty PostgreSQL (migrated once), keys/tokens/logins "
        f"shared, a conversation moved with {prefilled:.0f} tokens prefilled of "
        f"{after['token_count']}, kill -9 mid-reply survived, {len(files)} state files whole"
    )
