"""Role-play benchmark: N users each holding a T-turn conversation at the same time, through the real app.

    python bench/roleplay.py --demo-shape 12x768 --users 4 --turns 20

Every user is a guest with the bundled default character; each turn is a streamed `/chat/reply`
exactly as the Vue UI sends it (form body, greedy sampling so every reply has `--reply-tokens`
tokens on the random demo model). The whole stack runs (uvicorn on a free local port, routes,
services, SQLite, state store, engine) in this process; the clients stream over real HTTP. Because
each reply continues from the last node's state snapshot, a turn only prefills its new user message:
the time per turn should not grow with the conversation. Prints, per turn, the median time to first
chunk and to the end of the reply across users, the turn-T / turn-1 ratios, and the aggregate
throughput (generated tokens per second over the whole run and per-user turns per second), and
writes JSON.
"""

# ruff: noqa: RUF001

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from rwkv_gateway.app import create_app
from rwkv_gateway.engine.demo_model import write_demo_model
from rwkv_gateway.settings import Settings
from stats import percentile, save_result

GREEDY = {"tau": "3", "rate": "0.1", "min_p": "0.05", "temperature": "0", "presence_penalty": "0.2"}
CHARACTER = "星野"


async def user_session(client: httpx.AsyncClient, turns: int, start: asyncio.Event) -> list[dict[str, float]]:
    guest = (await client.post("/login/tmp", data={"token": "null"})).json()["data"]
    me = {"user_name": guest["user_name"], "token": guest["token"], "character_name": CHARACTER}
    await client.post("/characters/load", data=me)
    await start.wait()
    rows = []
    for turn in range(turns):
        fields = {**me, "prompt": f"第{turn + 1}个问题：今晚能看到哪些星座？", **GREEDY}
        t0 = time.perf_counter()
        first = None
        async with client.stream("POST", "/chat/reply", data=fields) as resp:
            async for _ in resp.aiter_bytes():
                first = first or time.perf_counter()
        end = time.perf_counter()
        rows.append(
            {"turn": turn + 1, "first_ms": ((first or end) - t0) * 1000, "total_ms": (end - t0) * 1000}
        )
    return rows


async def run(model: Path, data_dir: Path, users: int, turns: int, reply_tokens: int) -> dict[str, Any]:
    settings = Settings(
        model=model,
        data_dir=data_dir,
        roleplay_max_reply_tokens=reply_tokens,
        max_batch_size=max(users, 1),
        log_level="warning",
    )
    app = create_app(settings)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    serving = asyncio.create_task(server.serve())
    try:
        while not server.started:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        await asyncio.wait_for(app.state.services.model.ready.wait(), 600)
        engine = app.state.services.model.engine
        limits = httpx.Limits(max_connections=users + 4)
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", timeout=600, limits=limits
        ) as client:
            start = asyncio.Event()
            sessions = [asyncio.create_task(user_session(client, turns, start)) for _ in range(users)]
            await asyncio.sleep(0.5)
            while engine.stats()["active_sequences"]:  # noqa: ASYNC110 - the loads' persona prefill
                await asyncio.sleep(0.01)
            before = engine.stats()
            t0 = time.perf_counter()
            start.set()
            per_user = await asyncio.gather(*sessions)
            wall = time.perf_counter() - t0
            after = engine.stats()
    finally:
        server.should_exit = True
        await serving
    generated = after["generated_tokens"] - before["generated_tokens"]
    prefilled = after["prompt_tokens"] - before["prompt_tokens"]
    by_turn = []
    for turn in range(turns):
        firsts = [rows[turn]["first_ms"] for rows in per_user]
        totals = [rows[turn]["total_ms"] for rows in per_user]
        by_turn.append(
            {
                "turn": turn + 1,
                "first_ms_p50": percentile(firsts, 0.5),
                "total_ms_p50": percentile(totals, 0.5),
            }
        )
    return {
        "users": users,
        "turns": turns,
        "reply_tokens": reply_tokens,
        "wall_s": wall,
        "generated_tokens": generated,
        "prefilled_tokens": prefilled,
        "tokens_per_s": generated / wall,
        "turns_per_s": users * turns / wall,
        "by_turn": by_turn,
        "first_last_over_first": by_turn[-1]["first_ms_p50"] / by_turn[0]["first_ms_p50"],
        "total_last_over_first": by_turn[-1]["total_ms_p50"] / by_turn[0]["total_ms_p50"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="checkpoint (default: generate one of --demo-shape)")
    parser.add_argument("--demo-shape", default="2x128")
    parser.add_argument("--strategy", default="cpu fp32")
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--turns", type=int, default=20)
    parser.add_argument("--reply-tokens", type=int, default=32)
    parser.add_argument("--out")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            path = Path(args.model)
        else:
            layers, embd = (int(x) for x in args.demo_shape.lower().split("x"))
            path = write_demo_model(
                Path(tmp) / f"bench-v7-L{layers}-D{embd}.pth", "v7", n_layer=layers, n_embd=embd
            )
        # Warm-up run (TorchScript and the first allocations), then the measured one on a fresh data dir.
        asyncio.run(run(path, Path(tmp) / "warm", 1, 2, 4))
        result = asyncio.run(run(path, Path(tmp) / "data", args.users, args.turns, args.reply_tokens))
    result["model"] = args.model or f"generated v7 {args.demo_shape}"
    for row in result["by_turn"]:
        print(
            f"turn {row['turn']:>3}: first chunk {row['first_ms_p50']:8.1f} ms, "
            f"whole reply {row['total_ms_p50']:8.1f} ms (median of {args.users} users)"
        )
    print(
        f"turn {args.turns} / turn 1: first chunk x{result['first_last_over_first']:.2f}, "
        f"whole reply x{result['total_last_over_first']:.2f}; "
        f"{result['generated_tokens']} tokens in {result['wall_s']:.1f} s "
        f"= {result['tokens_per_s']:.1f} tokens/s "
        f"({result['turns_per_s']:.2f} turns/s), {result['prefilled_tokens']} tokens prefilled"
    )
    print(f"wrote {save_result(result, args.out, 'roleplay')}", file=sys.stderr)


if __name__ == "__main__":
    main()
