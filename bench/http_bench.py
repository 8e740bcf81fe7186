"""HTTP throughput benchmark: concurrent streaming chat completions against a running gateway.

    python bench/http_bench.py --url http://127.0.0.1:8000 --concurrency 1,4,16 --tokens 128
    python bench/http_bench.py --url URL --engine-json bench/results/engine-123.json   # + HTTP/engine ratio
    python bench/http_bench.py --spawn-demo 2x128 --concurrency 1,4 --tokens 32       # starts its own server

For each concurrency C it opens C simultaneous `POST /v1/chat/completions` streams (the engine bench's
prompt, temperature 1, top_p 0.9, a fixed seed, `max_tokens=--tokens`) with httpx, counts generated
tokens from `stream_options.include_usage`, and reports aggregate decode tok/s (tokens / time from the
first content delta of any stream to the end of the last), per-stream tok/s, and time to the first
content delta p50/p95. With `--engine-json` (the JSON bench/engine.py wrote for the same model and
strategy) it adds HTTP tok/s / engine tok/s at each concurrency: what the HTTP layer costs. Unlike
bench/engine.py, a stream can end early (end-of-text or a chat stop string); tokens are counted as
generated, so rates stay honest, and the table shows the mean tokens per request.

Prints a table and writes JSON (default bench/results/http-<time>.json).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import platform
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spawn import serve, wait_ready, write_model
from stats import Arrivals, percentile, save_result

if TYPE_CHECKING:
    import httpx

USER_TEXT = "Tell me a long story about a lighthouse keeper and the sea."  # = bench/engine.py's PROMPT


# ---------------------------------------------------------------------------- one stream


async def one_stream(client: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    """One streamed chat completion: start, first content delta, end (perf_counter), tokens, and the
    longest wait between two content deltas after the first (`gap`, seconds)."""
    t0 = time.perf_counter()
    arrivals = Arrivals()
    tokens = 0
    error: str | None = None
    finish: str | None = None
    async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            text = (await resp.aread()).decode(errors="replace")
            return {"start": t0, "first": None, "end": time.perf_counter(), "tokens": 0, "error": text}
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue
            payload = line[5:].strip()
            if payload == "[DONE]":
                break
            event = json.loads(payload)
            if event.get("error"):
                error = str(event["error"].get("message", event["error"]))
                continue
            for choice in event.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    arrivals.mark()
                finish = choice.get("finish_reason") or finish
            if event.get("usage"):
                tokens = int(event["usage"]["completion_tokens"])
    end = time.perf_counter()
    return {
        "start": t0,
        "first": arrivals.first,
        "end": end,
        "tokens": tokens,
        "error": error,
        "finish": finish,
        "gap": arrivals.gap,
    }


async def decode_run(
    client: httpx.AsyncClient, model: str, concurrency: int, tokens: int, seed: int
) -> dict[str, Any]:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": USER_TEXT}],
        "temperature": 1.0,
        "top_p": 0.9,
        "seed": seed,
        "max_tokens": tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    results = await asyncio.gather(*(one_stream(client, body) for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    ok = [r for r in results if r["error"] is None]
    total = sum(r["tokens"] for r in ok)
    firsts = [r["first"] for r in ok if r["first"] is not None]
    decode_wall = max(r["end"] for r in ok) - min(firsts) if firsts else float("nan")
    rate = total / decode_wall if firsts and decode_wall > 0 else float("nan")
    ttft = [(r["first"] - r["start"]) * 1000 for r in ok if r["first"] is not None]
    return {
        "concurrency": concurrency,
        "tokens_per_request": tokens,
        "generated_tokens": total,
        "mean_tokens": total / len(ok) if ok else 0.0,
        "errors": len(results) - len(ok),
        "error_samples": sorted({str(r["error"])[:200] for r in results if r["error"] is not None})[:3],
        "finish_reasons": sorted({str(r.get("finish")) for r in ok}),
        "wall_s": wall,
        "decode_tok_s": rate,
        "per_stream_tok_s": rate / concurrency,
        "ttft_p50_ms": percentile(ttft, 0.5),
        "ttft_p95_ms": percentile(ttft, 0.95),
    }


# ---------------------------------------------------------------------------- a server of our own


@contextlib.contextmanager
def spawn_demo(shape: str, strategy: str, max_concurrency: int) -> Iterator[str]:
    """Generate a v7 checkpoint of LAYERSxWIDTH, serve it on a free port, yield its URL, stop it."""
    with tempfile.TemporaryDirectory(prefix="bench-http-") as tmp:
        env = {
            "RWKV_GATEWAY_MAX_BATCH_SIZE": str(max(max_concurrency, 1)),
            "RWKV_GATEWAY_QUEUE_SIZE": str(max(2 * max_concurrency, 16)),
        }
        with serve(write_model(shape, Path(tmp)), strategy, Path(tmp), env) as server:
            yield server.url


# ---------------------------------------------------------------------------- the run


def engine_rows(path: str | None) -> dict[int, dict[str, Any]]:
    """bench/engine.py's decode rows by concurrency."""
    if not path:
        return {}
    data = json.loads(Path(path).read_text())
    return {int(row["concurrency"]): row for row in data.get("decode", [])}


async def bench(url: str, args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    levels = [int(c) for c in args.concurrency.split(",")]
    headers = {"Authorization": f"Bearer {args.api_key or 'bench'}"}
    limits = httpx.Limits(max_connections=max(levels) + 4, max_keepalive_connections=max(levels) + 4)
    timeout = httpx.Timeout(args.timeout, connect=30)
    ready = wait_ready(url, None, timeout=args.ready_timeout)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=timeout) as client:
        models = await client.get("/v1/models")
        models.raise_for_status()
        model = args.model or models.json()["data"][0]["id"]
        await decode_run(client, model, 1, 8, args.seed)  # warm-up (TorchScript compiles on first calls)
        decode = [await decode_run(client, model, c, args.tokens, args.seed) for c in levels]
    base = decode[0]["decode_tok_s"]
    engine = engine_rows(args.engine_json)
    for row in decode:
        row["speedup_vs_first"] = row["decode_tok_s"] / base if base == base and base > 0 else float("nan")
        engine_row = engine.get(row["concurrency"])
        engine_rate = float(engine_row["decode_tok_s"]) if engine_row else None
        row["engine_decode_tok_s"] = engine_rate
        row["engine_tokens_per_request"] = engine_row.get("tokens_per_request") if engine_row else None
        row["http_vs_engine"] = row["decode_tok_s"] / engine_rate if engine_rate else None
    return {
        "url": url,
        "model": model,
        "spawned_demo": args.spawn_demo,
        "server": {k: ready.get(k) for k in ("rwkv_version", "strategy", "n_layer", "n_embd", "demo_model")},
        "engine_json": args.engine_json,
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "decode": decode,
    }


def print_table(result: dict[str, Any]) -> None:
    server = result["server"]
    print(
        f"model: {result['model']} at {result['url']} (RWKV v{server['rwkv_version']}, "
        f"{server['n_layer']}x{server['n_embd']}, {server['strategy']})"
    )
    header = ("conc", "tok/s", "per stream", "x vs C=1", "ttft p50 ms", "ttft p95 ms", "tok/req", "vs engine")
    print("{:>5} {:>9} {:>11} {:>9} {:>12} {:>12} {:>8} {:>10}".format(*header))
    for row in result["decode"]:
        ratio = "-" if row["http_vs_engine"] is None else f"{row['http_vs_engine']:.2f}"
        print(
            f"{row['concurrency']:>5} {row['decode_tok_s']:>9.1f} {row['per_stream_tok_s']:>11.1f} "
            f"{row['speedup_vs_first']:>9.2f} {row['ttft_p50_ms']:>12.1f} {row['ttft_p95_ms']:>12.1f} "
            f"{row['mean_tokens']:>8.1f} {ratio:>10}"
        )
        if row["errors"]:
            print(f"      {row['errors']} request(s) failed: {row['error_samples']}")
        engine_tokens = row["engine_tokens_per_request"]
        if engine_tokens is not None and engine_tokens != row["tokens_per_request"]:
            ours = row["tokens_per_request"]
            print(f"      note: the engine JSON used {engine_tokens} tokens per request, not {ours}")
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--url", default="http://127.0.0.1:8000", help="base URL of a running gateway")
    target.add_argument("--spawn-demo", metavar="LxD", help="serve a generated v7 model of this shape")
    parser.add_argument("--strategy", default="cpu fp32", help="strategy of the spawned server")
    parser.add_argument("--api-key", help="Bearer key (when the server has keys)")
    parser.add_argument("--model", help="model id to request (default: the one /v1/models lists)")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--tokens", type=int, default=128, help="max_tokens of each request")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--timeout", type=float, default=600.0, help="per-request read timeout (s)")
    parser.add_argument("--ready-timeout", type=float, default=60.0, help="wait this long for /readyz")
    parser.add_argument("--engine-json", help="bench/engine.py JSON for the same model: adds the ratio")
    parser.add_argument("--out", help="JSON output path")
    args = parser.parse_args()

    if args.spawn_demo:
        max_c = max(int(c) for c in args.concurrency.split(","))
        with spawn_demo(args.spawn_demo, args.strategy, max_c) as url:
            result = asyncio.run(bench(url, args))
    else:
        result = asyncio.run(bench(args.url.rstrip("/"), args))
    print_table(result)
    print(f"wrote {save_result(result, args.out, 'http')}", file=sys.stderr)


if __name__ == "__main__":
    main()
