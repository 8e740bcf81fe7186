"""Prefill benchmark: prompt tokens per second of the batched RWKV-7 forward, chunked WKV against the loop.

    python bench/prefill.py --demo-shape 12x768                       # CPU reference shapes
    python bench/prefill.py --model PATH.pth --strategy "cuda fp16" --shapes 1x4096,32x128,256x16

For each shape BxT (B prompts of T tokens from the zero state, one forward) it times the forward with
the WKV recurrence in chunked form (`_wkv_chunked`, what prompts of 16 tokens or more take) and with
the token-by-token loop (`_wkv`, what they took before), alternating the two, and reports the best of
`--repeats` for each: tok/s = B * T / time, and the ratio. Both forms run in the same process on the
same weights, so the ratio holds even though this CPU's speed drifts from minute to minute. A T above
the server's `prefill_chunk` (128 by default) is what one forward would take without that cap (the
4k-token figure a GPU run reports). Writes JSON (default bench/results/prefill-<time>.json).
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from rwkv_gateway.engine.backend_batched_v7 import BatchedRwkv7Backend
from rwkv_gateway.engine.demo_model import write_demo_model
from rwkv_gateway.engine.threads import model_thread
from stats import save_result

LOOP = 1 << 30  # `wkv_chunk_from` that no prompt reaches: every chunk takes the token loop


def timed_forward(backend: BatchedRwkv7Backend, tokens: list[list[int]]) -> float:
    if backend.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    backend.forward(tokens, [None] * len(tokens))
    if backend.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def measure(backend: BatchedRwkv7Backend, batch: int, length: int, repeats: int) -> dict[str, Any]:
    tokens = [[(31 * b + 7 * t) % 60000 + 100 for t in range(length)] for b in range(batch)]
    chunked_from = backend.wkv_chunk_from
    best = {"chunked": float("inf"), "loop": float("inf")}
    try:
        for _ in range(repeats + 1):  # the first round warms up both forms
            for form, start in (("chunked", chunked_from), ("loop", LOOP)):
                backend.wkv_chunk_from = start
                best[form] = min(best[form], timed_forward(backend, tokens))
    finally:
        backend.wkv_chunk_from = chunked_from
    return {
        "batch": batch,
        "tokens": length,
        "chunked_tok_s": batch * length / best["chunked"],
        "loop_tok_s": batch * length / best["loop"],
        "speedup": best["loop"] / best["chunked"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, help="RWKV-7 checkpoint (default: generate --demo-shape)")
    parser.add_argument("--demo-shape", default="12x768", help="generated v7 LAYERSxWIDTH")
    parser.add_argument("--strategy", default="cpu fp32")
    parser.add_argument("--shapes", default="1x32,1x128,1x512,8x32,32x32,8x128", help="BxT,...")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="JSON output path")
    args = parser.parse_args()
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        path = args.model
        if path is None:
            layers, embd = (int(x) for x in args.demo_shape.lower().split("x"))
            path = write_demo_model(Path(tmp) / "bench-prefill.pth", "v7", n_layer=layers, n_embd=embd)
        # Loaded and run on one thread, as the server does (engine/threads.py).
        thread = model_thread()
        try:
            backend = thread.submit(BatchedRwkv7Backend.load, path, args.strategy).result()
            print(f"{'B':>4} {'T':>5} {'chunked tok/s':>14} {'loop tok/s':>11} {'x':>6}")
            rows = []
            for batch, length in shapes:
                row = thread.submit(measure, backend, batch, length, args.repeats).result()
                rows.append(row)
                print(
                    f"{batch:>4} {length:>5} {row['chunked_tok_s']:>14.0f} {row['loop_tok_s']:>11.0f} "
                    f"{row['speedup']:>6.2f}",
                    flush=True,
                )
        finally:
            thread.shutdown()
    result = {
        "model": str(args.model) if args.model else f"generated v7 {args.demo_shape}",
        "strategy": args.strategy,
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "shapes": rows,
    }
    print(f"wrote {save_result(result, args.out, 'prefill')}")


if __name__ == "__main__":
    main()
