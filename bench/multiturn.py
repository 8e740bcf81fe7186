"""Multi-turn benchmark: a chat that resends its whole history every turn, with the prefix cache on and off.

    python bench/multiturn.py --demo-shape 12x768 --turns 20

Each turn renders the history with the chat template (turn by turn, as the OpenAI dialect does), asks
for `--reply-tokens` greedy tokens and records the time to first token. With the cache, a turn only
prefills its new user message (the previous reply was prefilled right after it was sent); without
it, every turn prefills the whole history. Prints TTFT of turn 1 and turn N and their ratio for both
modes, and writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rwkv_gateway.domain.prompts import ChatMessage, ChatTemplate
from rwkv_gateway.domain.types import GenerationRequest, SamplingParams, TextDelta
from rwkv_gateway.engine.backend_batched_v7 import BatchedRwkv7Backend
from rwkv_gateway.engine.demo_model import write_demo_model
from rwkv_gateway.engine.loader import load_model
from rwkv_gateway.engine.protocol import Backend
from rwkv_gateway.engine.scheduler import EngineConfig, Scheduler
from rwkv_gateway.engine.states import StateStore
from rwkv_gateway.engine.tokenizer import load_tokenizer
from stats import save_result


async def conversation(engine: Scheduler, turns: int, reply_tokens: int) -> list[dict[str, float]]:
    template = ChatTemplate()
    history = [ChatMessage("system", "You are a helpful assistant who answers every question at length.")]
    rows = []
    for turn in range(turns):
        history.append(ChatMessage("user", f"Turn {turn}: tell me one more fact about the ocean, please."))
        req = GenerationRequest(
            prompt_segments=template.segments(history),
            reply_followup=template.assistant_followup,
            sampling=SamplingParams(temperature=0),
            max_tokens=reply_tokens,
            stop=template.stops,
            stop_on_eos=False,
        )
        t0 = time.perf_counter()
        stream = await engine.submit(req)
        first = None
        parts = []
        async for event in stream:
            if isinstance(event, TextDelta):
                first = first or time.perf_counter()
                parts.append(event.text)
            else:
                usage = event.usage
        end = time.perf_counter()
        history.append(ChatMessage("assistant", "".join(parts).strip()))
        # Wait out the reply's follow-up prefill (off the clock); the engine exposes no idle event.
        while engine.stats()["active_sequences"]:  # noqa: ASYNC110
            await asyncio.sleep(0.005)
        rows.append(
            {
                "turn": turn + 1,
                "prompt_tokens": usage.prompt_tokens,
                "cached_tokens": usage.cached_tokens,
                "ttft_ms": ((first or end) - t0) * 1000,
            }
        )
    return rows


async def run(backend: Backend, turns: int, reply_tokens: int, cache: bool) -> list[dict[str, float]]:
    with tempfile.TemporaryDirectory() as tmp:
        store = StateStore(Path(tmp), budget_bytes=2**30, model_id=backend.info.model_id)
        engine = Scheduler(
            backend,
            load_tokenizer(None, backend.info.vocab_size),
            EngineConfig(prefix_cache=cache),
            states=store,
        )
        await engine.start()
        try:
            return await conversation(engine, turns, reply_tokens)
        finally:
            await engine.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="checkpoint (default: generate one of --demo-shape)")
    parser.add_argument("--demo-shape", default="2x128")
    parser.add_argument("--strategy", default="cpu fp32")
    parser.add_argument("--turns", type=int, default=20)
    parser.add_argument("--reply-tokens", type=int, default=32)
    parser.add_argument("--backend", choices=("package", "batched"), default="batched")
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
        backend: Any = (
            BatchedRwkv7Backend.load(path, args.strategy)
            if args.backend == "batched"
            else load_model(path, args.strategy)
        )
        asyncio.run(run(backend, 2, 4, True))  # warm-up (TorchScript compiles on first calls)
        result: dict[str, Any] = {
            "model": args.model or f"generated v7 {args.demo_shape}",
            "turns": args.turns,
            "backend": type(backend).__name__,
        }
        for mode, cache in (("cache_on", True), ("cache_off", False)):
            rows = asyncio.run(run(backend, args.turns, args.reply_tokens, cache))
            ratio = rows[-1]["ttft_ms"] / rows[0]["ttft_ms"]
            result[mode] = {"rows": rows, "ttft_last_over_first": ratio}
            print(
                f"{mode:>9}: TTFT turn 1 {rows[0]['ttft_ms']:8.1f} ms, turn {args.turns} "
                f"{rows[-1]['ttft_ms']:8.1f} ms, ratio {ratio:5.2f}, "
                f"last prompt {rows[-1]['prompt_tokens']} tokens ({rows[-1]['cached_tokens']} cached)"
            )
    print(f"wrote {save_result(result, args.out, 'multiturn')}", file=sys.stderr)


if __name__ == "__main__":
    main()
