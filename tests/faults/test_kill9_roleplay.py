"""kill -9 in the middle of role-play turns, 20 times: a live server runs streamed replies in three
conversations and is killed (SIGKILL) while they stream. After each restart on the same data dir
every conversation loads (the killed turn either fully there or not at all) and continues, every
state file reads back, the SQLite database passes its integrity check, and no temp file is left."""

from __future__ import annotations

import contextlib
import random
import signal
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

import httpx
from live import CARD, GREEDY, call, form, reply_frames

from rwkv_gateway.engine.states import load_snapshot
from support.live import LiveServer, log_tail, start_server

KILLS = 20
CONVERSATIONS = 3
SETTINGS = {"roleplay_max_reply_tokens": "16", "prefill_chunk": "16"}


def check_disk(data_dir: Path, checked: dict[Path, int]) -> int:
    """Every state file reads back whole; no temp file is left; the database is intact. Files already
    read back unchanged (same mtime) are not read again."""
    states = data_dir / "states"
    leftovers = [p for p in states.rglob("*") if p.is_file() and not p.name.endswith(".state")]
    assert leftovers == [], leftovers
    files = list(states.rglob("*.state"))
    for path in files:
        mtime = path.stat().st_mtime_ns
        if checked.get(path) != mtime:
            load_snapshot(path)  # raises StateMismatch on a torn or corrupt file
            checked[path] = mtime
    with contextlib.closing(sqlite3.connect(data_dir / "gateway.db")) as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    return len(files)


def test_kill_9_mid_turn_loses_nothing_committed(
    v7_path: Path, tmp_path: Path, figure: Callable[[str], None]
) -> None:
    rng = random.Random(9)
    data_dir = tmp_path / "data"
    live = start_server(v7_path, data_dir, **SETTINGS)
    chats: list[dict[str, str]] = []
    for _ in range(CONVERSATIONS):
        guest = call(live, "/login/tmp", {"token": "null"})
        auth = {"user_name": guest["user_name"], "token": guest["token"]}
        call(live, "/characters/save", {**auth, **CARD})
        chats.append({**auth, "character_name": CARD["bot"]})
    known = [call(live, "/characters/load", c)["chat"] for c in chats]
    torn_turns = landed_turns = state_files = 0
    checked: dict[Path, int] = {}
    for kill in range(KILLS):
        prompt = f"第{kill}句"
        gate = threading.Event()

        def stream(fields: dict[str, str], live: LiveServer = live, gate: threading.Event = gate) -> None:
            try:
                with httpx.stream("POST", f"{live.url}/chat/reply", **form(fields), timeout=60) as resp:
                    for _ in resp.iter_raw():
                        gate.set()
            except httpx.TransportError:
                pass  # the server is killed under it
            finally:
                gate.set()

        threads = [
            threading.Thread(target=stream, args=({**c, "prompt": prompt, **GREEDY},), daemon=True)
            for c in chats
        ]
        for t in threads:
            t.start()
        assert gate.wait(60)
        # Somewhere in the turns: while they prefill, stream or write their states.
        threading.Event().wait(rng.uniform(0, 0.3))
        assert live.stop(signal.SIGKILL) == -signal.SIGKILL
        for t in threads:
            t.join(60)
        live = start_server(v7_path, data_dir, **SETTINGS)
        state_files = check_disk(data_dir, checked)
        for i, c in enumerate(chats):
            chat = call(live, "/characters/load", c)["chat"]
            if chat == known[i]:
                torn_turns += 1  # the killed turn left nothing behind
            else:
                assert chat[:-1] == known[i], (chat, known[i])
                assert chat[-1][0] == prompt and chat[-1][1], chat[-1]
                landed_turns += 1
            # The conversation continues: one more turn, completed before the next kill.
            reply = reply_frames(
                httpx.post(
                    f"{live.url}/chat/reply", **form({**c, "prompt": "继续", **GREEDY}), timeout=60
                ).text
            )
            assert reply, log_tail(live.log)
            known[i] = call(live, "/characters/load", c)["chat"]
            assert known[i][-1] == ["继续", reply[-1]]
    assert live.stop() == 0
    check_disk(data_dir, {})  # everything, once more
    figure(
        f"kill -9: {KILLS} kills mid-turn x {CONVERSATIONS} conversations = {KILLS * CONVERSATIONS} turns "
        f"interrupted ({landed_turns} had landed whole, {torn_turns} left nothing), "
        f"{KILLS * CONVERSATIONS} follow-up turns ok, 0 corrupt of {state_files} state files, "
        "0 temp files, 0 lost"
    )
