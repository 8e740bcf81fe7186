"""Serving benchmark: what the whole server delivers to N simultaneous users, against the bare forward.

    python bench/serving.py --demo-shape 12x768 --users 1,8,32            # the reference run (CPU)
    python bench/serving.py --model PATH.pth --strategy "cuda fp16" --users 1,32,128,256
    python bench/serving.py --users 32 --reply-tokens 128 --profile       # + py-spy of the server

Starts `rwkv-gateway serve` as its own process (the clients never share its interpreter) on a generated,
text-safe random-weight RWKV-7 of `--demo-shape` (or `--model`) that never writes a newline (a role-play
reply ends at a blank line, so a random model would end replies at random lengths and the batch would
shrink as a level goes on; this way every reply runs `--reply-tokens` tokens, N users are N decoding rows
from the first token to the last, and served tok/s compares with the bare forward at N), then for each
dialect and each N:

* **role-play**: N guests, each with the bundled character loaded, send one `/chat/reply` at the same
  instant with the Vue UI's default sampling (`tau=3 rate=0.1 min_p=0.05 temperature=2
  presence_penalty=0.2`), replies up to `--reply-tokens` tokens;
* **openai**: N streamed `/v1/chat/completions` at the same instant (temperature 1, top_p 0.9, a
  different user message and seed each, `max_tokens=--reply-tokens`).

Reported per level: aggregate decode tok/s (tokens generated, counted by the server's own
`rwkv_gateway_generated_tokens_total`, over the time from the first streamed token to the last reply's
end), time to first token p50/p95 (request sent to first streamed chunk), per-user decode tok/s (median
over users of that user's tokens over its own first-chunk-to-end time), the longest pause inside a
started stream (median and worst over users: decoding waits while other users' prompts are prefilled),
the server process's CPU use in cores (from /proc, user + system, over the same window), and the ratio
to the single user's rate.

In the same run, with the server idle, this process loads the same checkpoint and measures the bare
batched forward at each batch size N (N decode rows, states advanced in place as the scheduler does,
median step time; tok/s = N / step) and the `rwkv` package's own single sequence (before and after the
served levels: the CPU's speed drifts). **Efficiency** = served tok/s / forward tok/s at N.

`--profile` records the server with py-spy (`pip install py-spy`) during the largest level of each
dialect and stores, beside the JSON, the collapsed stacks and a summary per thread (share of the wall
time each thread was busy, hottest functions). Even non-blocking sampling slows the forward, so take
profiles in a run of their own, not in the run whose figures you report.

Writes JSON (default bench/results/serving-<time>.json) and, with matplotlib (`pip install -e
'.[bench]'`), a PNG plot of tok/s and efficiency against users.
"""

# ruff: noqa: RUF001

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import torch

from http_bench import one_stream
from rwkv_gateway.engine.backend_batched_v7 import BatchedRwkv7Backend
from rwkv_gateway.engine.loader import load_model
from spawn import Server, serve, write_model
from stats import Arrivals, percentile, save_result

UI_SAMPLING = {"tau": "3", "rate": "0.1", "min_p": "0.05", "temperature": "2", "presence_penalty": "0.2"}
CHARACTER = "星野"
TOPICS = [
    "星座",
    "海边的灯塔",
    "秋天的森林",
    "下雨的城市",
    "远方的火车",
    "深夜的书店",
    "山顶的日出",
    "旧相册",
]
ROLEPLAY_EVENT = b"\n\ndata: "
CLK_TCK = os.sysconf("SC_CLK_TCK")
RUN_IDS = itertools.count(1)
PROFILE_RATE = 100  # py-spy samples per second


# ---------------------------------------------------------------------------- server-side readings


def _stat_cpu_seconds(stat: Path) -> float:
    """User + system CPU seconds from a /proc `stat` file (of a process or of one thread)."""
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (ended ones included)."""
    return _stat_cpu_seconds(Path(f"/proc/{pid}/stat"))


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds per thread name (the engine names its threads; OpenMP workers take their creator's
    name, so `rwkv-model` is the model thread with its intra-op team)."""
    out: collections.Counter[str] = collections.Counter()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            out[name] += _stat_cpu_seconds(task / "stat")
        except OSError:  # the thread ended meanwhile
            continue
    return dict(out)


ENGINE_FIGURES = ("steps", "decode_rows", "step_seconds", "forward_seconds", "sample_seconds", "loop_seconds")


async def server_figures(client: httpx.AsyncClient, dialect: str) -> dict[str, float]:
    """The server's own counts: generated tokens of one dialect, and the engine's step timers."""
    text = (await client.get("/metrics")).text
    pattern = rf'^rwkv_gateway_generated_tokens_total\{{[^}}]*dialect="{dialect}"[^}}]*\}} (\S+)$'
    out = {"tokens": sum(float(m.group(1)) for m in re.finditer(pattern, text, re.MULTILINE))}
    for name in ENGINE_FIGURES:
        found = re.search(rf"^rwkv_gateway_engine_{name}_total (\S+)$", text, re.MULTILINE)
        out[name] = float(found.group(1)) if found else float("nan")
    return out


async def wait_idle(client: httpx.AsyncClient, limit_s: float = 180.0) -> None:
    """Until the engine runs nothing (a finished reply's follow-up prefill may still be running)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        text = (await client.get("/metrics")).text
        running = re.search(r"^rwkv_gateway_requests_running (\S+)$", text, re.MULTILINE)
        waiting = re.search(r"^rwkv_gateway_requests_waiting (\S+)$", text, re.MULTILINE)
        if not (running and float(running.group(1))) and not (waiting and float(waiting.group(1))):
            return
        await asyncio.sleep(0.5)


def engine_breakdown(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Per engine step during a level: rows decoded, and milliseconds in each part of the step."""
    steps = after["steps"] - before["steps"]
    if not steps:
        return {}
    per = {name: (after[name] - before[name]) / steps for name in ENGINE_FIGURES if name != "steps"}
    return {
        "steps": steps,
        "decode_rows_per_step": per["decode_rows"],
        "step_ms": per["step_seconds"] * 1000,
        "forward_ms": per["forward_seconds"] * 1000,
        "sample_ms": per["sample_seconds"] * 1000,
        "other_in_step_ms": (per["step_seconds"] - per["forward_seconds"] - per["sample_seconds"]) * 1000,
        "between_steps_ms": per["loop_seconds"] * 1000,
    }


# ---------------------------------------------------------------------------- one user of each dialect


class Start:
    """Users set themselves up (log in, load a character), then all send at the same instant."""

    def __init__(self, users: int) -> None:
        self.waiting = users
        self.all_ready = asyncio.Event()
        self.go = asyncio.Event()

    async def ready(self) -> None:
        self.waiting -= 1
        if self.waiting == 0:
            self.all_ready.set()
        await self.go.wait()

    async def everyone_ready(self) -> None:
        await self.all_ready.wait()


async def roleplay_user(client: httpx.AsyncClient, index: int, start: Start, run_id: int) -> dict[str, Any]:
    """A guest with the default character; one reply as the Vue UI asks for it, sent when `start` is set."""
    guest = (await client.post("/login/tmp", data={"token": "null"})).json()["data"]
    me = {"user_name": guest["user_name"], "token": guest["token"], "character_name": CHARACTER}
    loaded = (await client.post("/characters/load", data=me)).json()
    if loaded.get("code") != 200:
        await start.ready()
        return {"error": str(loaded), "first": None}
    topic = TOPICS[index % len(TOPICS)]
    fields = {**me, "prompt": f"你好！给我讲讲{topic}的故事吧。（{run_id}-{index}）", **UI_SAMPLING}
    await start.ready()
    t0 = time.perf_counter()
    arrivals = Arrivals()
    chunks = 0
    tail = b""
    error: str | None = None
    async with client.stream("POST", "/chat/reply", data=fields) as resp:
        async for raw in resp.aiter_raw():
            if arrivals.first is None and not raw.startswith(ROLEPLAY_EVENT):  # an error: one JSON body
                error = raw.decode(errors="replace")[:200]
                break
            # Every event resends the whole reply so far; count event starts, not bytes.
            data = tail + raw
            count = data.count(ROLEPLAY_EVENT)
            if count:
                arrivals.mark()
            chunks += count
            tail = data[-(len(ROLEPLAY_EVENT) - 1) :]
    end = time.perf_counter()
    return {
        "start": t0,
        "first": arrivals.first,
        "end": end,
        "chunks": chunks,
        "error": error,
        "gap": arrivals.gap,
    }


async def openai_user(
    client: httpx.AsyncClient, index: int, start: Start, run_id: int, model: str, tokens: int
) -> dict[str, Any]:
    body = {
        "model": model,
        "messages": [
            {"role": "user", "content": f"Tell me a long story about {TOPICS[index % 8]} ({run_id}-{index})."}
        ],
        "temperature": 1.0,
        "top_p": 0.9,
        "seed": index,
        "max_tokens": tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    await start.ready()
    return await one_stream(client, body)


async def level(
    client: httpx.AsyncClient, server: Server, dialect: str, users: int, args: argparse.Namespace, model: str
) -> dict[str, Any]:
    """N users of one dialect at the same instant; the level's figures."""
    start = Start(users)
    run_id = next(RUN_IDS)  # prompts never repeat across levels (no prefix-cache hits between them)
    metric = "roleplay" if dialect == "roleplay" else "openai"
    if dialect == "roleplay":
        tasks = [asyncio.create_task(roleplay_user(client, i, start, run_id)) for i in range(users)]
    else:
        tasks = [
            asyncio.create_task(openai_user(client, i, start, run_id, model, args.reply_tokens))
            for i in range(users)
        ]
    await start.everyone_ready()  # every guest logged in, its character loaded (persona prefilled)
    await wait_idle(client)  # nothing left over from the previous level
    await asyncio.sleep(0.2)
    before = await server_figures(client, metric)
    cpu0, wall0 = cpu_seconds(server.pid), time.perf_counter()
    threads0, client0 = thread_cpu_seconds(server.pid), time.process_time()
    profiler = start_profiler(server, args, dialect, users)
    start.go.set()
    results = await asyncio.gather(*tasks)
    cpu1, wall1 = cpu_seconds(server.pid), time.perf_counter()
    threads1, client1 = thread_cpu_seconds(server.pid), time.process_time()
    wall = wall1 - wall0
    by_thread = {name: (t - threads0.get(name, 0.0)) / wall for name, t in threads1.items()}
    profile = stop_profiler(profiler)
    after = await server_figures(client, metric)
    total = after["tokens"] - before["tokens"]
    ok = [r for r in results if r["error"] is None and r["first"] is not None]
    if not ok:
        raise SystemExit(f"{dialect} at {users} users: every request failed: {results[0]}")
    first = min(r["first"] for r in ok)
    last = max(r["end"] for r in ok)
    rate = total / (last - first) if last > first else float("nan")
    ttft = [(r["first"] - r["start"]) * 1000 for r in ok]
    # Per user: its own tokens over its own decode time (role-play counts events; scaled to tokens).
    counts = [r.get("tokens") or r.get("chunks") or 0 for r in ok]
    scale = total / sum(counts) if sum(counts) else 1.0
    per_user = [
        c * scale / (r["end"] - r["first"]) for c, r in zip(counts, ok, strict=True) if r["end"] > r["first"]
    ]
    return {
        "dialect": dialect,
        "users": users,
        "errors": len(results) - len(ok),
        "error_samples": sorted({str(r["error"])[:200] for r in results if r["error"] is not None})[:3],
        "generated_tokens": total,
        "mean_tokens": total / len(ok),
        "wall_s": wall1 - wall0,
        "decode_s": last - first,
        "tok_s": rate,
        "ttft_p50_ms": percentile(ttft, 0.5),
        "ttft_p95_ms": percentile(ttft, 0.95),
        "ttft_ms": sorted(round(t) for t in ttft),
        # The longest a stream waited between two deltas once it had started (prompts of users who
        # arrived together being prefilled while it decodes): median and worst over users.
        "stall_p50_ms": statistics.median(r["gap"] for r in ok) * 1000,
        "stall_max_ms": max(r["gap"] for r in ok) * 1000,
        "per_user_tok_s": statistics.median(per_user) if per_user else float("nan"),
        "server_cpu_cores": (cpu1 - cpu0) / wall,
        "server_cpu_by_thread": {
            k: round(v, 3) for k, v in sorted(by_thread.items(), key=lambda kv: -kv[1]) if v > 0.005
        },
        "client_cpu_cores": (client1 - client0) / wall,
        "engine": engine_breakdown(before, after),
        "profile": profile,
    }


# ---------------------------------------------------------------------------- the bare forward


def forward_rate(backend: BatchedRwkv7Backend, batch: int, seconds: float) -> dict[str, float]:
    """Decode steps of `batch` rows through the batched backend alone: median step, tok/s."""
    tokens = [[(7 * i + 11) % 1000 + 100] for i in range(batch)]
    logits, states = backend.forward(tokens, [None] * batch)
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(times) < 5 or time.perf_counter() < deadline:
        t0 = time.perf_counter()
        logits, states = backend.forward(tokens, list(states), overwrite=True)
        logits.sum().item()  # a GPU step is over when its logits can be read
        times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    return {"batch": batch, "step_ms": step * 1000, "tok_s": batch / step, "steps": len(times)}


def package_rate(model: Any, seconds: float) -> float:
    """One sequence through the `rwkv` package's own forward (its tok/s)."""
    state = None
    token = 100
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    with torch.inference_mode():
        model.forward([token], None)
        while len(times) < 5 or time.perf_counter() < deadline:
            t0 = time.perf_counter()
            logits, state = model.forward([token], state)
            token = int(logits.argmax()) if logits.device.type == "cpu" else 100
            times.append(time.perf_counter() - t0)
    return 1 / statistics.median(times)


# ---------------------------------------------------------------------------- profiling the server


def start_profiler(
    server: Server, args: argparse.Namespace, dialect: str, users: int
) -> dict[str, Any] | None:
    if not args.profile or users != max(args.user_levels):
        return None
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        raise SystemExit("--profile needs py-spy (pip install py-spy)")
    out = args.profile_dir / f"{dialect}-{users}.txt"
    command = [
        py_spy,
        "record",
        "--nonblocking",  # sampling must not pause the server's threads (an OpenMP team stalls)
        "-p",
        str(server.pid),
        "-r",
        str(PROFILE_RATE),
        "--threads",
        "-f",
        "raw",
        "-o",
        str(out),
    ]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return {"proc": proc, "out": out, "t0": time.perf_counter()}


def stop_profiler(profiler: dict[str, Any] | None) -> dict[str, Any] | None:
    if profiler is None:
        return None
    proc = profiler["proc"]
    seconds = time.perf_counter() - profiler["t0"]
    proc.send_signal(2)  # py-spy writes its output on SIGINT
    proc.wait(timeout=60)
    return summarize_profile(profiler["out"], seconds)


#: Leaf frames of a thread that is waiting, not working (py-spy samples them as if active).
IDLE_LEAVES = (
    "Condition.wait ",
    "_worker (thread.py:81)",  # an executor thread waiting for work
    "_connection_worker_thread ",  # aiosqlite's thread waiting for a query
    "Runner.run (runners.py:118)",  # the event loop inside epoll
    "Event.wait ",
    "Thread.join ",
    "select ",
)


def summarize_profile(path: Path, seconds: float, rate: int = PROFILE_RATE) -> dict[str, Any]:
    """Per thread: how busy it was (share of the level's wall time) and where its busy samples went
    (own time of the innermost frame, and time inside each function)."""
    busy: collections.Counter[str] = collections.Counter()
    own: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    inclusive: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = stack.split(";")
        thread = re.sub(r"^thread \(\d+\): ?|\"", "", frames[0]).strip() or "?"
        thread = re.sub(r"_\d+$", "", thread)  # executor threads: one name per pool
        names = [re.sub(r" \(.*?/?([^/]+:\d+)\)$", r" (\1)", f) for f in frames[1:]]
        if not names or names[-1].startswith(IDLE_LEAVES):
            continue
        busy[thread] += count
        own[thread][names[-1]] += count
        for name in set(names):
            inclusive[thread][name] += count
    wall = seconds * rate
    return {
        "file": str(path),
        "seconds": seconds,
        "threads": {
            thread: {
                "busy": n / wall,
                "self": [[f, round(c / n, 3)] for f, c in own[thread].most_common(8)],
                "inclusive": [[f, round(c / n, 3)] for f, c in inclusive[thread].most_common(14)],
            }
            for thread, n in busy.most_common()
        },
    }


# ---------------------------------------------------------------------------- the run


async def bench(server: Server, args: argparse.Namespace) -> list[dict[str, Any]]:
    limits = httpx.Limits(
        max_connections=max(args.user_levels) + 8, max_keepalive_connections=max(args.user_levels) + 8
    )
    timeout = httpx.Timeout(args.timeout, connect=30)
    async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=timeout) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        rows = []
        for dialect in args.dialect_list:
            warm = argparse.Namespace(**{**vars(args), "reply_tokens": 8, "profile": False})
            await level(client, server, dialect, 2, warm, model)
            for users in args.user_levels:
                row = await level(client, server, dialect, users, args, model)
                print_row(row)
                rows.append(row)
        return rows


HEADER = ("dialect", "users", "tok/s", "ttft p50", "ttft p95", "user t/s", "cpu", "tok/req")


def print_row(row: dict[str, Any]) -> None:
    print(
        f"{row['dialect']:>9} {row['users']:>5} {row['tok_s']:>8.1f} {row['ttft_p50_ms']:>9.0f} "
        f"{row['ttft_p95_ms']:>9.0f} {row['per_user_tok_s']:>9.2f} {row['server_cpu_cores']:>5.2f} "
        f"{row['mean_tokens']:>7.0f}"
    )
    if row["errors"]:
        print(f"      {row['errors']} failed: {row['error_samples']}")
    stall, worst = row["stall_p50_ms"], row["stall_max_ms"]
    print(f"      longest pause in a stream: median {stall:.0f} ms, worst {worst:.0f} ms")
    threads = ", ".join(f"{name} {cores:.2f}" for name, cores in row["server_cpu_by_thread"].items())
    print(f"      server cores by thread: {threads}; client {row['client_cpu_cores']:.2f} cores")
    if eng := row["engine"]:
        print(
            f"      per step: {eng['decode_rows_per_step']:.1f} decode rows, {eng['step_ms']:.1f} ms in the "
            f"model thread (forward {eng['forward_ms']:.1f}, sampling {eng['sample_ms']:.1f}, other "
            f"{eng['other_in_step_ms']:.1f}), {eng['between_steps_ms']:.1f} ms between steps"
        )
    sys.stdout.flush()


def run(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    try:
        model_path = args.model or write_model(args.demo_shape, workdir, newlines=False)
        backend = BatchedRwkv7Backend.load(model_path, args.strategy)
        package = load_model(model_path, args.strategy).model
        forward: dict[int, dict[str, float]] = {}
        package_runs = [package_rate(package, args.forward_seconds)]
        for users in args.user_levels:
            forward[users] = forward_rate(backend, users, args.forward_seconds)
        env = {
            "RWKV_GATEWAY_ROLEPLAY_MAX_REPLY_TOKENS": str(args.reply_tokens),
            "RWKV_GATEWAY_QUEUE_SIZE": str(max(256, 2 * max(args.user_levels))),
        }
        if max(args.user_levels) > 32:
            env["RWKV_GATEWAY_MAX_BATCH_SIZE"] = str(max(args.user_levels))
        env.update(dict(item.split("=", 1) for item in args.env))
        print("{:>9} {:>5} {:>8} {:>9} {:>9} {:>9} {:>5} {:>7}".format(*HEADER))
        with serve(Path(model_path), args.strategy, workdir, env) as server:
            rows = asyncio.run(bench(server, args))
        package_runs.append(package_rate(package, args.forward_seconds))
        for users in args.user_levels:  # again after: the mean of both stands for the run
            again = forward_rate(backend, users, args.forward_seconds)
            forward[users]["tok_s_after"] = again["tok_s"]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    package_single = statistics.mean(package_runs)
    for row in rows:
        fwd = forward[row["users"]]
        row["forward_tok_s"] = (fwd["tok_s"] + fwd["tok_s_after"]) / 2
        row["efficiency"] = row["tok_s"] / row["forward_tok_s"]
        single = next(
            r for r in rows if r["dialect"] == row["dialect"] and r["users"] == min(args.user_levels)
        )
        row["x_vs_single_user"] = row["tok_s"] / single["tok_s"]
        row["ttft_x_vs_single_user"] = row["ttft_p50_ms"] / single["ttft_p50_ms"]
        row["per_user_x_vs_package_single"] = row["per_user_tok_s"] / package_single
    return {
        "model": str(args.model) if args.model else f"generated v7 {args.demo_shape}, no newline tokens",
        "strategy": args.strategy,
        "reply_tokens": args.reply_tokens,
        "server_env": env,
        "machine": {
            "platform": platform.platform(),
            "cpu_threads": os.cpu_count(),
            "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "package_single_tok_s": package_single,
        "package_single_runs": package_runs,
        "forward": [forward[u] for u in args.user_levels],
        "levels": rows,
    }


def print_summary(result: dict[str, Any]) -> None:
    package = result["package_single_tok_s"]
    print(f"\n{result['model']}, {result['strategy']}; rwkv package, one sequence: {package:.1f} tok/s")
    header = ("dialect", "users", "tok/s", "forward", "effic.", "x 1 user", "ttft x", "user/pkg")
    print("{:>9} {:>5} {:>8} {:>8} {:>7} {:>8} {:>7} {:>8}".format(*header))
    for row in result["levels"]:
        print(
            f"{row['dialect']:>9} {row['users']:>5} {row['tok_s']:>8.1f} {row['forward_tok_s']:>8.1f} "
            f"{row['efficiency']:>7.2f} {row['x_vs_single_user']:>8.2f} {row['ttft_x_vs_single_user']:>7.2f} "
            f"{row['per_user_x_vs_package_single']:>8.2f}"
        )


def plot(result: dict[str, Any], png: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    levels = result["levels"]
    users = sorted({r["users"] for r in levels})
    forward = {r["users"]: r["forward_tok_s"] for r in levels}
    ax1.plot(users, [forward[u] for u in users], "k--o", label="bare batched forward")
    for dialect, style in (("roleplay", "-o"), ("openai", "-s")):
        rows = [r for r in levels if r["dialect"] == dialect]
        if not rows:
            continue
        ax1.plot([r["users"] for r in rows], [r["tok_s"] for r in rows], style, label=f"served: {dialect}")
        ax2.plot([r["users"] for r in rows], [r["efficiency"] for r in rows], style, label=dialect)
    ax1.axhline(result["package_single_tok_s"], color="grey", linestyle=":", label="rwkv package, 1 sequence")
    ax1.set_xlabel("simultaneous users")
    ax1.set_ylabel("aggregate tok/s")
    ax1.set_xscale("log", base=2)
    ax1.legend(fontsize=8)
    ax2.axhline(0.8, color="grey", linestyle=":", label="target 0.8")
    ax2.set_xlabel("simultaneous users")
    ax2.set_ylabel("served / forward")
    ax2.set_xscale("log", base=2)
    ax2.set_ylim(0, 1.1)
    ax2.legend(fontsize=8)
    fig.suptitle(
        f"{result['model']}, {result['strategy']}, replies up to {result['reply_tokens']} tokens", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", type=Path, help="RWKV-7 checkpoint (.pth)")
    source.add_argument("--demo-shape", default="12x768", help="generated v7 LAYERSxWIDTH (default 12x768)")
    parser.add_argument("--strategy", default="cpu fp32")
    parser.add_argument("--users", default="1,8,32", help="simultaneous users per level")
    parser.add_argument("--dialects", default="roleplay,openai")
    parser.add_argument("--reply-tokens", type=int, default=512)
    parser.add_argument(
        "--forward-seconds", type=float, default=3.0, help="time per bare-forward measurement"
    )
    parser.add_argument(
        "--env", action="append", default=[], metavar="KEY=VALUE", help="extra server setting"
    )
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--profile", action="store_true", help="py-spy the server at the largest level")
    parser.add_argument("--out", help="JSON output path")
    args = parser.parse_args()
    args.user_levels = [int(u) for u in args.users.split(",")]
    args.dialect_list = [d.strip() for d in args.dialects.split(",") if d.strip()]
    if unknown := set(args.dialect_list) - {"roleplay", "openai"}:
        raise SystemExit(f"unknown dialects: {sorted(unknown)}")
    out = (
        Path(args.out) if args.out else Path(__file__).parent / "results" / f"serving-{int(time.time())}.json"
    )
    args.profile_dir = out.with_suffix("")
    if args.profile:
        args.profile_dir.mkdir(parents=True, exist_ok=True)
    result = run(args)
    print_summary(result)
    path = save_result(result, str(out), "serving")
    print(f"wrote {path}", file=sys.stderr)
    if plot(result, path.with_suffix(".png")):
        print(f"wrote {path.with_suffix('.png')}", file=sys.stderr)


if __name__ == "__main__":
    main()
