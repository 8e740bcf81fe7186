"""Engine throughput benchmark: drives the scheduler in-process at several concurrency levels.

    python bench/engine.py --model PATH.pth --concurrency 1,4,16 --tokens 128
    python bench/engine.py --demo-shape 12x768 --concurrency 1,4,16,64   # a generated 0.1B-shaped v7

For each concurrency C it runs C simultaneous requests (short prompt, `--tokens` new tokens each, no
early stop) and reports aggregate decode tok/s (from the first token to the last; and "steady": while
all C sequences decode, leaving out staggered prefills and finishes), time to first token p50/p95, and
the ratio to C=1; then
a prefill run (C prompts of `--prefill-tokens` tokens, max_tokens 0, for each C of `--prefill-concurrency`)
for prefill tok/s. Every request has a prompt of its own, so a cached prefix never stands in for
prefill. `--state-cache-mb N` gives the engine a snapshot cache of N MiB as the server has (prefix
checkpoints at each prompt's end); `--report-memory` adds, per level, the CUDA allocator's peak and
reserved memory and the snapshot cache's bytes and entries. For an RWKV-7
model served by the batched backend it also measures, in the same run, one sequence through the `rwkv`
package's backend (before and after the batched levels, since this CPU's speed drifts), and reports
every level as a multiple of the mean of the two. Prints a table, writes JSON
(default bench/results/engine-<time>.json) and, with matplotlib installed (`pip install -e '.[bench]'`),
a PNG plot of tok/s against concurrency beside it.

`--grammar-rows N` measures structured output's cost instead (bench/grammar_cost.py): N rows all
unconstrained against N rows half of them JSON-constrained, in one run, per decode step:

    python bench/engine.py --demo-shape 12x768 --grammar-rows 32 \
        --out bench/results/grammar-cost-12x768-cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from grammar_cost import compare, print_table
from rwkv_gateway.domain.types import Finish, GenerationRequest, SamplingParams, TextDelta
from rwkv_gateway.engine.backend_batched_v7 import BatchedRwkv7Backend
from rwkv_gateway.engine.demo_model import write_demo_model
from rwkv_gateway.engine.loader import load_model
from rwkv_gateway.engine.scheduler import EngineConfig, Scheduler
from rwkv_gateway.engine.states import StateStore
from rwkv_gateway.engine.tokenizer import load_tokenizer
from stats import percentile, save_result

PROMPT = "User: Tell me a long story about a lighthouse keeper and the sea.\n\nAssistant:"


async def one_request(engine: Scheduler, req: GenerationRequest) -> dict[str, Any]:
    t0 = time.perf_counter()
    stream = await engine.submit(req)
    first: float | None = None
    tokens = 0
    arrivals: list[tuple[float, int]] = []  # (time, tokens) of each text delta
    async for event in stream:
        if isinstance(event, TextDelta):
            now = time.perf_counter()
            first = first or now
            arrivals.append((now, len(event.token_ids)))
        if isinstance(event, Finish):
            tokens = event.usage.completion_tokens
    end = time.perf_counter()
    return {"start": t0, "first": first or end, "end": end, "tokens": tokens, "arrivals": arrivals}


def steady_rate(results: list[dict[str, Any]]) -> float:
    """Tokens per second while every sequence of the run was decoding: from the last first token to
    the first finish (staggered prompt prefills and the tail of early finishers left out)."""
    start = max(r["first"] for r in results)
    end = min(r["end"] for r in results)
    tokens = sum(n for r in results for t, n in r["arrivals"] if start < t <= end)
    return tokens / (end - start) if end > start and tokens else float("nan")


async def decode_run(engine: Scheduler, concurrency: int, tokens: int, tag: str) -> dict[str, Any]:
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=7)
    reqs = [
        GenerationRequest(
            prompt=f"Story {tag}.{i}\n\n{PROMPT}", sampling=params, max_tokens=tokens, stop_on_eos=False
        )
        for i in range(concurrency)
    ]
    t0 = time.perf_counter()
    results = await asyncio.gather(*(one_request(engine, r) for r in reqs))
    wall = time.perf_counter() - t0
    total = sum(r["tokens"] for r in results)
    decode_start = min(r["first"] for r in results)
    decode_wall = max(r["end"] for r in results) - decode_start
    ttft = [(r["first"] - r["start"]) * 1000 for r in results]
    return {
        "concurrency": concurrency,
        "tokens_per_request": tokens,
        "generated_tokens": total,
        "wall_s": wall,
        "decode_tok_s": total / decode_wall if decode_wall > 0 else float("nan"),
        "steady_decode_tok_s": steady_rate(results),
        "per_stream_tok_s": total / decode_wall / concurrency if decode_wall > 0 else float("nan"),
        "ttft_p50_ms": percentile(ttft, 0.5),
        "ttft_p95_ms": percentile(ttft, 0.95),
    }


async def prefill_run(engine: Scheduler, concurrency: int, prompt_tokens: int) -> dict[str, Any]:
    text = "The quick brown fox jumps over the lazy dog. " * (prompt_tokens // 8 + 1)
    prompts = [engine.tokenizer.encode(f"Document {concurrency}.{i}\n\n{text}") for i in range(concurrency)]
    reqs = [GenerationRequest(prompt_tokens=ids[:prompt_tokens], max_tokens=0) for ids in prompts]
    t0 = time.perf_counter()
    await asyncio.gather(*(one_request(engine, r) for r in reqs))
    wall = time.perf_counter() - t0
    return {
        "concurrency": concurrency,
        "prompt_tokens": len(reqs[0].prompt_tokens or ()),
        "prefill_tok_s": sum(len(r.prompt_tokens or ()) for r in reqs) / wall,
    }


class MemoryProbe:
    """Per level: the CUDA caching allocator's peak since the level began and what it holds reserved
    (the model's weights included), and the snapshot cache's host memory (`--report-memory`)."""

    def __init__(self, enabled: bool, store: StateStore | None) -> None:
        self.enabled = enabled
        self.store = store
        self.cuda = enabled and torch.cuda.is_available()

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def read(self) -> dict[str, Any] | None:
        if not self.enabled:
            return None
        mib = 2**20
        out: dict[str, Any] = {"host_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        if self.cuda:
            torch.cuda.synchronize()
            out["cuda_peak_allocated_mib"] = torch.cuda.max_memory_allocated() / mib
            out["cuda_allocated_mib"] = torch.cuda.memory_allocated() / mib
            out["cuda_peak_reserved_mib"] = torch.cuda.max_memory_reserved() / mib
            out["cuda_reserved_mib"] = torch.cuda.memory_reserved() / mib
        if self.store is not None:
            stats = self.store.stats()
            out["state_cache_mib"] = stats["ram_bytes"] / mib
            out["state_cache_entries"] = stats["ram_entries"]
            out["state_cache_evictions"] = stats["evictions"]
        return out

    async def level(self, run: Any) -> dict[str, Any]:
        """Await one level's run (a coroutine) and add its `memory` figures."""
        self.start()
        row: dict[str, Any] = await run
        if (memory := self.read()) is not None:
            row["memory"] = memory
        return row


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    tmp: tempfile.TemporaryDirectory[str] | None = None
    if args.model:
        path = Path(args.model)
    else:
        layers, embd = (int(x) for x in args.demo_shape.lower().split("x"))
        tmp = tempfile.TemporaryDirectory()
        path = write_demo_model(
            Path(tmp.name) / f"bench-v7-L{layers}-D{embd}.pth", "v7", n_layer=layers, n_embd=embd
        )
    if args.backend == "batched":
        backend: Any = BatchedRwkv7Backend.load(path, args.strategy)
    else:
        backend = load_model(path, args.strategy)
    tokenizer = load_tokenizer(None, backend.info.vocab_size)
    levels = [int(c) for c in args.concurrency.split(",")]
    prefill_levels = [int(c) for c in (args.prefill_concurrency or args.concurrency).split(",")]
    config = EngineConfig(
        max_batch_size=max(levels + prefill_levels),
        queue_size=max(levels + prefill_levels) * 2,
        prefill_chunk=args.chunk,
        prefill_budget=args.chunk * 4,
    )
    package: Any = None
    if args.backend == "batched" and not args.no_package_baseline:
        # The reference: one sequence through the rwkv package, on the same machine in the same run.
        package = load_model(path, args.strategy)
    package_runs: list[dict[str, Any]] = []
    store: StateStore | None = None
    if args.state_cache_mb:
        # As the server has it (engine/runtime.py): a host-memory LRU of prefix checkpoints.
        tmp = tmp or tempfile.TemporaryDirectory()
        budget = args.state_cache_mb * 2**20
        store = StateStore(Path(tmp.name) / "states", budget_bytes=budget, model_id=backend.info.model_id)
    memory = MemoryProbe(args.report_memory, store)
    after_load = memory.read()
    if args.grammar_rows:
        config = EngineConfig(max_batch_size=args.grammar_rows, queue_size=args.grammar_rows * 2)
        cost = await compare(lambda: Scheduler(backend, tokenizer, config), args.grammar_rows, args.tokens, 3)
        if tmp is not None:
            tmp.cleanup()
        return {"model": f"generated v7 {args.demo_shape}" if not args.model else str(path), "grammar": cost}

    async def measure_package() -> None:
        ref = Scheduler(package, tokenizer, EngineConfig(max_batch_size=1, queue_size=4))
        await ref.start()
        try:
            await decode_run(ref, 1, 8, "package-warmup")
            package_runs.append(await decode_run(ref, 1, args.tokens, "package"))
        finally:
            await ref.aclose()

    engine = Scheduler(backend, tokenizer, config, states=store)
    try:
        # The package's figure is taken before and after the batched runs (this CPU's speed drifts
        # from minute to minute); the ratios use the mean of the two.
        if package is not None:
            await measure_package()
        await engine.start()
        try:
            await decode_run(engine, 1, 8, "warmup")  # warm-up (TorchScript compiles on first calls)
            decode = [await memory.level(decode_run(engine, c, args.tokens, f"d{c}")) for c in levels]
        finally:
            await engine.aclose()
        if package is not None:
            await measure_package()
        engine = Scheduler(backend, tokenizer, config, states=store)
        await engine.start()
        try:
            prefill = [
                await memory.level(prefill_run(engine, c, args.prefill_tokens)) for c in prefill_levels
            ]
        finally:
            await engine.aclose()
    finally:
        if tmp is not None:
            tmp.cleanup()
    package_single: dict[str, Any] | None = None
    if package_runs:
        rates = [run["decode_tok_s"] for run in package_runs]
        package_single = {"decode_tok_s": sum(rates) / len(rates), "runs": package_runs}
    base = decode[0]["decode_tok_s"]
    for row in decode:
        row["speedup_vs_first"] = row["decode_tok_s"] / base
        if package_single is not None:
            row["x_vs_package_single"] = row["decode_tok_s"] / package_single["decode_tok_s"]
            row["steady_x_vs_package_single"] = row["steady_decode_tok_s"] / package_single["decode_tok_s"]
    return {
        "model": str(path) if args.model else f"generated v7 {args.demo_shape}",
        "rwkv_version": backend.info.version,
        "strategy": args.strategy,
        "backend": type(backend).__name__,
        "machine": {
            "platform": platform.platform(),
            "cpu_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__,
        },
        "state_cache_mb": args.state_cache_mb,
        "state_nbytes": getattr(backend, "state_nbytes", None),
        "memory_after_load": after_load,
        "package_single": package_single,
        "decode": decode,
        "prefill": prefill,
    }


def print_memory(result: dict[str, Any]) -> None:
    """One line per level: CUDA peak allocated / reserved (MiB), the snapshot cache's MiB and entries."""

    def line(what: str, memory: dict[str, Any] | None) -> str:
        if memory is None:
            return f"{what:<16} -"
        cuda = "no cuda"
        if "cuda_peak_allocated_mib" in memory:
            peak, reserved = memory["cuda_peak_allocated_mib"], memory["cuda_reserved_mib"]
            cuda = f"cuda peak {peak:>7.0f} MiB allocated, {reserved:>7.0f} reserved"
        cache = (
            f"; snapshot cache {memory['state_cache_mib']:.0f} MiB in {memory['state_cache_entries']} "
            f"({memory['state_cache_evictions']} evicted)"
            if "state_cache_mib" in memory
            else ""
        )
        return f"{what:<16} {cuda}{cache}; host peak RSS {memory['host_peak_rss_mib']:.0f} MiB"

    per_state = result["state_nbytes"]
    print(f"memory (live state per sequence: {per_state / 2**20:.2f} MiB)" if per_state else "memory")
    print(line("after load", result["memory_after_load"]))
    for row in result["decode"]:
        print(line(f"decode C={row['concurrency']}", row.get("memory")))
    for row in result["prefill"]:
        print(line(f"prefill C={row['concurrency']}", row.get("memory")))


def plot(result: dict[str, Any], png: Path) -> bool:
    """Aggregate and per-stream decode tok/s against concurrency (False without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    levels = [row["concurrency"] for row in result["decode"]]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(levels, [r["decode_tok_s"] for r in result["decode"]], "o-", label="aggregate decode tok/s")
    steady = [r["steady_decode_tok_s"] for r in result["decode"]]
    ax.plot(levels, steady, "^-", label="aggregate, all sequences decoding")
    ax.plot(levels, [r["per_stream_tok_s"] for r in result["decode"]], "s--", label="per stream tok/s")
    if result.get("package_single"):
        ref = result["package_single"]["decode_tok_s"]
        ax.axhline(ref, color="grey", linestyle=":", label=f"rwkv package, 1 sequence ({ref:.1f})")
    ax.set_xscale("log", base=2)
    ax.set_xticks(levels, [str(c) for c in levels])
    ax.set_xlabel("concurrent sequences")
    ax.set_ylabel("tokens / s")
    ax.set_title(f"{result['model']}, {result['strategy']}, {result['backend']}", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="checkpoint to load (default: generate one of --demo-shape)")
    parser.add_argument("--demo-shape", default="2x128", help="LAYERSxWIDTH of the generated v7 model")
    parser.add_argument("--strategy", default="cpu fp32")
    parser.add_argument("--backend", choices=("package", "batched"), default="batched")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--prefill-concurrency", help="prompts per prefill run (default: --concurrency)")
    parser.add_argument("--chunk", type=int, default=128, help="prefill chunk per sequence per step")
    parser.add_argument(
        "--no-package-baseline", action="store_true", help="skip the rwkv package single-sequence run"
    )
    parser.add_argument(
        "--state-cache-mb", type=int, default=0, help="snapshot cache budget, as the server's (0: none)"
    )
    parser.add_argument(
        "--report-memory", action="store_true", help="CUDA peak/reserved and snapshot cache use per level"
    )
    parser.add_argument(
        "--grammar-rows", type=int, default=0, help="only measure constrained rows' cost at this batch"
    )
    parser.add_argument("--out", help="JSON output path")
    args = parser.parse_args()
    result = asyncio.run(main_async(args))
    if "grammar" in result:
        print(f"model: {result['model']}")
        print_table(result["grammar"])
        print(f"wrote {save_result(result, args.out, 'grammar-cost')}", file=sys.stderr)
        return
    model = f"{result['model']} (RWKV v{result['rwkv_version']}, {result['strategy']}, {result['backend']})"
    print(f"model: {model}")
    ref = result["package_single"]
    if ref is not None:
        each = ", ".join(f"{run['decode_tok_s']:.1f}" for run in ref["runs"])
        print(f"rwkv package backend, 1 sequence: {ref['decode_tok_s']:.1f} tok/s (mean of {each})")
    header = ("conc", "decode tok/s", "per stream", "x vs C=1", "x vs pkg 1", "steady tok/s", "steady x pkg")
    print(
        "{:>5} {:>13} {:>11} {:>9} {:>11} {:>13} {:>13} {:>12} {:>12}".format(*header, "ttft p50", "ttft p95")
    )
    for row in result["decode"]:
        vs_pkg = f"{row['x_vs_package_single']:>11.2f}" if ref is not None else f"{'-':>11}"
        steady_pkg = f"{row['steady_x_vs_package_single']:>13.2f}" if ref is not None else f"{'-':>13}"
        print(
            f"{row['concurrency']:>5} {row['decode_tok_s']:>13.1f} {row['per_stream_tok_s']:>11.1f} "
            f"{row['speedup_vs_first']:>9.2f} {vs_pkg} {row['steady_decode_tok_s']:>13.1f} {steady_pkg} "
            f"{row['ttft_p50_ms']:>12.1f} {row['ttft_p95_ms']:>12.1f}"
        )
    for row in result["prefill"]:
        rate, each = row["prefill_tok_s"], row["prompt_tokens"]
        print(f"prefill C={row['concurrency']:<3} {rate:>10.1f} tok/s ({each} tokens each)")
    if args.report_memory:
        print_memory(result)
    out = save_result(result, args.out, "engine")
    print(f"wrote {out}", file=sys.stderr)
    if plot(result, out.with_suffix(".png")):
        print(f"wrote {out.with_suffix('.png')}", file=sys.stderr)


if __name__ == "__main__":
    main()
