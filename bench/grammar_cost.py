"""What constrained rows cost a decode step: `python bench/engine.py --grammar-rows 32` runs this.

Two runs on the same engine, one after the other, repeated (this CPU's speed drifts): N rows all
unconstrained, then N rows of which half are constrained by a realistic JSON Schema (a Lark grammar
of one such object per line, so that a constrained row never finishes early). Every row decodes the
same number of tokens with the same sampling. Reported per decode step: the model thread's time, its
sampling part (which includes waiting for and applying the masks), the time the helper spent filling
the masks (overlapped with the forward), and the step's extra cost in percent of an unconstrained
step (docs/structured-output.md#how-masks-are-applied).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

from rwkv_gateway.domain.constraints import OutputConstraint
from rwkv_gateway.domain.types import GenerationRequest, SamplingParams
from rwkv_gateway.engine import grammar
from rwkv_gateway.engine.scheduler import Scheduler

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 1000000},
        "name": {"type": "string", "maxLength": 24},
        "status": {"enum": ["active", "suspended", "deleted"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 16},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                "country": {"enum": ["US", "DE", "FR", "CN", "JP"]},
            },
            "required": ["city", "zip", "country"],
        },
        "orders": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string", "maxLength": 8},
                    "quantity": {"type": "integer", "minimum": 1, "maximum": 99},
                    "gift": {"type": "boolean"},
                },
                "required": ["sku", "quantity"],
            },
            "maxItems": 3,
        },
    },
    "required": ["id", "name", "status", "tags", "address", "orders"],
}
#: One object per line, forever: the row decodes all its tokens under a real schema's masks.
_OBJ = {**SCHEMA, "additionalProperties": False, "x-guidance": grammar.JSON_OPTIONS}
LINES = f'start: obj ("\\n" obj)*\nobj: %json {json.dumps(_OBJ)}\n'
PROMPT = "User: List the customers as JSON, one per line.\n\nAssistant:"


class _FillTimer:
    """Times the helper's mask fills (wraps `grammar._fill_all` for the run; instrumentation only)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0
        self._inner = grammar._fill_all

    def __enter__(self) -> _FillTimer:
        def timed(rows: Any) -> None:
            t0 = time.perf_counter()
            self._inner(rows)
            self.seconds += time.perf_counter() - t0
            self.calls += 1

        grammar._fill_all = timed
        return self

    def __exit__(self, *exc: object) -> None:
        grammar._fill_all = self._inner


async def _run(engine: Scheduler, rows: int, constrained: int, tokens: int, tag: str) -> dict[str, Any]:
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=7)
    lines = OutputConstraint("grammar", grammar=LINES)
    reqs = [
        GenerationRequest(
            prompt=f"Run {tag}.{i}\n\n{PROMPT}",
            sampling=params,
            max_tokens=tokens,
            stop_on_eos=False,
            constraint=lines if i < constrained else None,
        )
        for i in range(rows)
    ]
    before_t, before_c = dict(engine.timers), dict(engine.counters)
    with _FillTimer() as fills:
        streams = await engine.submit_many(reqs)
        done = await asyncio.gather(*(s.collect() for s in streams))
    generated = sum(f.usage.completion_tokens for _, f in done)
    steps = engine.counters["steps"] - before_c["steps"]
    decode_rows = engine.counters["decode_rows"] - before_c["decode_rows"]
    # Decode steps: every step after the prompts' (all rows decode together here).
    step_s = engine.timers["step"] - before_t["step"]
    return {
        "rows": rows,
        "constrained": constrained,
        "generated_tokens": generated,
        "steps": steps,
        "decode_rows_per_step": decode_rows / max(1, steps),
        "step_ms": step_s / max(1, steps) * 1000,
        "forward_ms": (engine.timers["forward"] - before_t["forward"]) / max(1, steps) * 1000,
        "sample_ms": (engine.timers["sample"] - before_t["sample"]) / max(1, steps) * 1000,
        "mask_fill_ms": fills.seconds / max(1, steps) * 1000,
        "mask_fill_ms_per_row": fills.seconds / max(1, generated * constrained / rows) * 1000
        if constrained
        else 0.0,
    }


async def compare(
    make_engine: Callable[[], Scheduler], rows: int, tokens: int, repeats: int
) -> dict[str, Any]:
    """`repeats` pairs of runs (unconstrained, then half constrained) on one engine."""
    engine = make_engine()
    await engine.start()
    try:
        await _run(engine, 2, 1, 8, "warmup")  # compiles the grammar and builds the vocabulary
        pairs = []
        for r in range(repeats):
            plain = await _run(engine, rows, 0, tokens, f"p{r}")
            mixed = await _run(engine, rows, rows // 2, tokens, f"m{r}")
            pairs.append({"plain": plain, "mixed": mixed, "extra": mixed["step_ms"] / plain["step_ms"] - 1})
    finally:
        await engine.aclose()
    extra = [p["extra"] for p in pairs]
    fill_share = [p["mixed"]["mask_fill_ms"] / p["plain"]["step_ms"] for p in pairs]
    return {
        "rows": rows,
        "constrained": rows // 2,
        "tokens": tokens,
        "pairs": pairs,
        "extra_step_cost_median": statistics.median(extra),
        "mask_fill_share_of_step_median": statistics.median(fill_share),
    }


def print_table(result: dict[str, Any]) -> None:
    head = ("run", "rows", "constr.", "steps", "step ms", "forward ms", "sample ms", "mask fill ms")
    print("{:>8} {:>5} {:>8} {:>6} {:>9} {:>11} {:>10} {:>13}".format(*head))
    for i, pair in enumerate(result["pairs"]):
        for name in ("plain", "mixed"):
            row = pair[name]
            print(
                f"{name + str(i):>8} {row['rows']:>5} {row['constrained']:>8} {row['steps']:>6} "
                f"{row['step_ms']:>9.2f} {row['forward_ms']:>11.2f} {row['sample_ms']:>10.2f} "
                f"{row['mask_fill_ms']:>13.3f}"
            )
    print(
        f"half of {result['rows']} rows constrained: step time {result['extra_step_cost_median']:+.1%} "
        f"(median of {len(result['pairs'])} pairs); mask filling (on the helper, during the forward) "
        f"{result['mask_fill_share_of_step_median']:.1%} of an unconstrained step"
    )
