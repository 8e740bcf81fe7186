"""Compare the two constrained-decoding libraries on the World vocabulary (CPU): xgrammar and llguidance.

For each: building the tokenizer description (65536 raw-byte tokens), compiling a realistic JSON Schema
and `json_object`, and the time to fill the next-token bitmask per token while walking a valid reply,
for 1 and 16 matchers (the batch's constrained rows) filled together. Writes
bench/results/grammar-libs-cpu.json. Used once to choose the library (docs/structured-output.md#library).

    python bench/grammar_libs.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from rwkv_gateway.engine.tokenizer import WORLD_VOCAB_SIZE, WorldTokenizer

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0},
        "name": {"type": "string", "maxLength": 64},
        "email": {"type": "string"},
        "status": {"enum": ["active", "suspended", "deleted"]},
        "score": {"type": "number"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 8},
        "address": {
            "type": "object",
            "properties": {
                "street": {"type": "string"},
                "city": {"type": "string"},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                "country": {"enum": ["US", "DE", "FR", "CN", "JP"]},
            },
            "required": ["street", "city", "country"],
            "additionalProperties": False,
        },
        "orders": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string"},
                    "quantity": {"type": "integer", "minimum": 1},
                    "price": {"type": "number"},
                    "gift": {"type": "boolean"},
                },
                "required": ["sku", "quantity", "price"],
                "additionalProperties": False,
            },
        },
        "notes": {"type": ["string", "null"]},
    },
    "required": ["id", "name", "status", "address", "orders"],
    "additionalProperties": False,
}

REPLY = {
    "id": 4211,
    "name": "Zoë Müller",
    "email": "zoe@example.com",
    "status": "active",
    "score": 98.25,
    "tags": ["vip", "früh", "东京"],
    "address": {"street": "12 Rue de la Paix", "city": "Paris", "zip": "75002", "country": "FR"},
    "orders": [
        {"sku": "A-100", "quantity": 2, "price": 19.99, "gift": False},
        {"sku": "B-7", "quantity": 1, "price": 5.0},
    ],
    "notes": 'said "hi"\n\tand left',
}


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 4)


def bench_xgrammar(vocab: list[bytes], reply_ids: list[int], rows: list[int], reps: int) -> dict[str, Any]:
    import xgrammar as xgr

    t0 = time.perf_counter()
    info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=WORLD_VOCAB_SIZE, stop_token_ids=[0])
    compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
    tokenizer_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    schema_grammar = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False, strict_mode=True)
    schema_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiler.compile_builtin_json_grammar()
    object_s = time.perf_counter() - t0
    out: dict[str, Any] = {
        "tokenizer_info_ms": _ms(tokenizer_s),
        "compile_schema_ms": _ms(schema_s),
        "compile_json_object_ms": _ms(object_s),
    }
    batch = xgr.BatchGrammarMatcher(max_threads=2)
    for n in rows:
        per_token: list[float] = []
        for _ in range(reps):
            matchers = [xgr.GrammarMatcher(schema_grammar) for _ in range(n)]
            mask = xgr.allocate_token_bitmask(n, WORLD_VOCAB_SIZE)
            for tok in [*reply_ids, 0]:
                t0 = time.perf_counter()
                if n == 1:
                    matchers[0].fill_next_token_bitmask(mask, 0)
                else:
                    batch.batch_fill_next_token_bitmask(matchers, mask)
                per_token.append(time.perf_counter() - t0)
                for m in matchers:
                    assert m.accept_token(tok), tok
            assert all(m.is_terminated() for m in matchers)
        out[f"mask_ms_per_token_rows{n}"] = {
            "mean": _ms(statistics.fmean(per_token)),
            "p50": _ms(statistics.median(per_token)),
            "max": _ms(max(per_token)),
        }
    logits = torch.randn(16, WORLD_VOCAB_SIZE)
    mask = xgr.allocate_token_bitmask(16, WORLD_VOCAB_SIZE)
    t0 = time.perf_counter()
    for _ in range(20):
        xgr.apply_token_bitmask_inplace(logits, mask)
    out["apply_mask_ms_rows16"] = _ms((time.perf_counter() - t0) / 20)
    return out


def bench_llguidance(vocab: list[bytes], reply_ids: list[int], rows: list[int], reps: int) -> dict[str, Any]:
    import llguidance as llg
    import llguidance.torch as llt

    class _Vocab:
        eos_token_id = 0
        bos_token_id = None
        # llguidance marks special tokens with a leading 0xFF byte.
        tokens = [b"\xff<|endoftext|>", *vocab[1:]] + [b""] * (WORLD_VOCAB_SIZE - len(vocab))

        def __call__(self, s: bytes) -> list[int]:
            return WorldTokenizer().encode(s.decode("utf-8", "replace"))

    t0 = time.perf_counter()
    tok = llg.LLTokenizer(llg.TokenizerWrapper(_Vocab()), n_vocab=WORLD_VOCAB_SIZE, eos_token=0)
    tokenizer_s = time.perf_counter() - t0
    opts: Any = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
    t0 = time.perf_counter()
    grammar = llg.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA), defaults=opts)
    first = llg.LLMatcher(tok, grammar)
    assert not first.is_error(), first.get_error()
    schema_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    obj = llg.LLMatcher(tok, llg.LLMatcher.grammar_from_json_schema('{"type": "object"}', defaults=opts))
    assert not obj.is_error(), obj.get_error()
    object_s = time.perf_counter() - t0
    out: dict[str, Any] = {
        "tokenizer_info_ms": _ms(tokenizer_s),
        "compile_schema_ms": _ms(schema_s),
        "compile_json_object_ms": _ms(object_s),
    }
    executor = llg.LLExecutor(num_threads=2)
    for n in rows:
        per_token: list[float] = []
        for _ in range(reps):
            matchers = [llg.LLMatcher(tok, grammar) for _ in range(n)]
            mask = llt.allocate_token_bitmask(n, WORLD_VOCAB_SIZE)
            for t in [*reply_ids, 0]:
                t0 = time.perf_counter()
                if n == 1:
                    llt.fill_next_token_bitmask(matchers[0], mask, 0)
                else:
                    llt.fill_next_token_bitmask_par(executor, [(m, i) for i, m in enumerate(matchers)], mask)
                per_token.append(time.perf_counter() - t0)
                for m in matchers:
                    assert m.consume_token(t), (t, m.get_error())
            assert all(m.is_stopped() for m in matchers)
        out[f"mask_ms_per_token_rows{n}"] = {
            "mean": _ms(statistics.fmean(per_token)),
            "p50": _ms(statistics.median(per_token)),
            "max": _ms(max(per_token)),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results/grammar-libs-cpu.json"))
    args = parser.parse_args()
    world = WorldTokenizer()
    vocab = [world.token_bytes(i) for i in range(WORLD_VOCAB_SIZE)]
    reply_ids = world.encode(json.dumps(REPLY, ensure_ascii=False))
    rows = [1, 16]
    results = {
        "reply_tokens": len(reply_ids),
        "torch_threads": torch.get_num_threads(),
        "xgrammar": bench_xgrammar(vocab, reply_ids, rows, args.reps),
        "llguidance": bench_llguidance(vocab, reply_ids, rows, args.reps),
    }
    print(json.dumps(results, indent=2))
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
