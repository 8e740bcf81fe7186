"""Structured output through the real scheduler on a random-weight model: only the grammar can make
its replies valid, so every reply that ends with "stop" must parse and validate."""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jsonschema
import pytest
import torch

from rwkv_gateway.domain.constraints import TOOL_CALL_BEGIN, TOOL_CALL_END, OutputConstraint, ToolSpec
from rwkv_gateway.domain.types import Finish, FinishReason, GenerationRequest, SamplingParams
from rwkv_gateway.engine.backend_batched_v7 import BatchedRwkv7Backend
from rwkv_gateway.engine.grammar import Grammars, _VocabularyBytes, masked_rows, start_masks, strict_schema
from rwkv_gateway.engine.scheduler import EngineConfig, Scheduler
from rwkv_gateway.engine.states import StateStore
from rwkv_gateway.engine.tokenizer import Tokenizer, WorldTokenizer
from rwkv_gateway.errors import InvalidParameter

PROMPT = "User: Describe a person as JSON.\n\nAssistant:"
GREEDY = SamplingParams(temperature=0)
#: Closing tokens (`"`, `",`, `":`, `"}`, `}`, `]`, `}}`, `"]`, `},`, `}]`, `,`) made likelier, so that
#: a random model's free strings and numbers end within a test's token budget; which tokens are valid
#: where is still the grammar's alone.
CLOSING = dict.fromkeys((35, 384, 388, 399, 126, 94, 2408, 395, 2391, 2403, 45), 10.0)

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "score": {"type": "number"},
        "role": {"enum": ["admin", 'say "hi"\\ok', "naïve 東京"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
        },
        "nickname": {"type": ["string", "null"], "maxLength": 8},
    },
    "required": ["name", "age", "score", "role", "tags", "address"],
}
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
}
NOW: dict[str, Any] = {"type": "object", "properties": {}}
TOOLS = (
    ToolSpec("get_weather", json.dumps(WEATHER), strict=True),
    ToolSpec("now", json.dumps(NOW), strict=True),
)
CALL = re.compile(re.escape(TOOL_CALL_BEGIN) + r"(.*?)" + re.escape(TOOL_CALL_END), re.DOTALL)


@pytest.fixture(scope="module")
def backend(v7_path: Path) -> BatchedRwkv7Backend:
    return BatchedRwkv7Backend.load(v7_path, "cpu fp32")


@pytest.fixture
async def engine(
    backend: BatchedRwkv7Backend, tokenizer: Tokenizer, tmp_path: Path
) -> AsyncIterator[Scheduler]:
    states = StateStore(tmp_path, budget_bytes=1 << 28, model_id=backend.info.model_id)
    sched = Scheduler(backend, tokenizer, EngineConfig(max_batch_size=16, prefill_chunk=32), states=states)
    await sched.start()
    try:
        yield sched
    finally:
        await sched.aclose()


async def generate(
    engine: Scheduler, constraint: OutputConstraint | None, **kwargs: Any
) -> tuple[str, Finish]:
    fields: dict[str, Any] = {"prompt": PROMPT, "max_tokens": 160, "constraint": constraint, **kwargs}
    stream = await engine.submit(GenerationRequest(**fields))
    return await stream.collect()


def sampling(seed: int, **kwargs: Any) -> SamplingParams:
    return SamplingParams(**{"temperature": 1.0, "seed": seed, "logit_bias": CLOSING, **kwargs})


async def test_json_schema_replies_validate(engine: Scheduler) -> None:
    constraint = OutputConstraint("json_schema", schema=json.dumps(SCHEMA), strict=True)
    runs = [generate(engine, constraint, sampling=sampling(seed)) for seed in range(8)]
    results = await asyncio.gather(generate(engine, constraint, sampling=GREEDY), *runs)
    strict = strict_schema(SCHEMA)
    for text, finish in results:
        assert finish.reason is FinishReason.STOP, text
        value = json.loads(text)
        jsonschema.validate(value, strict)
        # Whitespace is bounded: exactly json.dumps' separators, nothing else outside strings.
        assert text == json.dumps(value, ensure_ascii=False)
    roles = {json.loads(text)["role"] for text, _ in results}
    assert roles <= set(SCHEMA["properties"]["role"]["enum"])


async def test_json_object_replies_are_objects(engine: Scheduler) -> None:
    constraint = OutputConstraint("json_object")
    results = await asyncio.gather(
        *(generate(engine, constraint, sampling=sampling(seed)) for seed in range(6))
    )
    for text, finish in results:
        assert finish.reason is FinishReason.STOP, text
        assert isinstance(json.loads(text), dict)


async def test_a_grammar_banned_token_is_never_sampled_even_with_logit_bias(engine: Scheduler) -> None:
    # "x" (token 121) pushed far above everything: the grammar still wins.
    params = SamplingParams(temperature=0, logit_bias={121: 100.0})
    schema = '{"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}'
    text, finish = await generate(
        engine, OutputConstraint("json_schema", schema=schema, strict=True), sampling=params
    )
    assert finish.reason is FinishReason.STOP
    assert json.loads(text) in ({"ok": True}, {"ok": False})
    free, _ = await generate(engine, None, sampling=params, max_tokens=4)
    assert free == "xxxx"


async def test_required_tool_calls_parse(engine: Scheduler) -> None:
    for parallel in (False, True):
        constraint = OutputConstraint("tool_calls", tools=TOOLS, tool_mode="required", parallel=parallel)
        # The demo model pins end of text (token 0) far below everything; after a call it competes
        # with "\n" and another call, so it is lifted back.
        end = {0: 1000.0} if parallel else {}
        results = await asyncio.gather(
            *(
                generate(engine, constraint, sampling=sampling(seed, logit_bias={**CLOSING, **end}))
                for seed in range(6)
            )
        )
        for text, finish in results:
            assert finish.reason is FinishReason.STOP, text
            calls = CALL.findall(text)
            assert calls and (parallel or len(calls) == 1)
            assert "\n".join(f"{TOOL_CALL_BEGIN}{c}{TOOL_CALL_END}" for c in calls) == text
            for body in calls:
                call = json.loads(body)
                assert list(call) == ["name", "arguments"]
                args = json.dumps(call["arguments"], ensure_ascii=False)
                assert body == f'{{"name": "{call["name"]}", "arguments": {args}}}'

                jsonschema.validate(
                    call["arguments"], strict_schema(WEATHER if call["name"] == "get_weather" else NOW)
                )


async def test_auto_tool_mode_text_never_opens_a_call(engine: Scheduler, tokenizer: Tokenizer) -> None:
    constraint = OutputConstraint("tool_calls", tools=TOOLS, tool_mode="auto")
    grammars = Grammars(tokenizer, 65536)
    assert accepts(grammars, constraint, "Just text, <b>no</b> call.")
    assert accepts(grammars, constraint, '<tool_call>{"name": "now", "arguments": {}}</tool_call>')
    assert not accepts(
        grammars, constraint, 'Let me call <tool_call>{"name": "now", "arguments": {}}</tool_call>'
    )
    results = await asyncio.gather(
        *(generate(engine, constraint, sampling=sampling(seed), max_tokens=40) for seed in range(4))
    )
    for text, _ in results:
        assert TOOL_CALL_BEGIN not in text or text.startswith(TOOL_CALL_BEGIN)


def test_none_tool_mode_is_text_without_calls(tokenizer: Tokenizer) -> None:
    """tool_choice "none" with tools in the prompt: any text, or none, but never a call (no tools needed)."""
    constraint = OutputConstraint("tool_calls", tool_mode="none")
    grammars = Grammars(tokenizer, 65536)
    assert accepts(grammars, constraint, "Just text, <b>no</b> call.")
    assert accepts(grammars, constraint, "")
    assert not accepts(grammars, constraint, '<tool_call>{"name": "now", "arguments": {}}</tool_call>')
    assert not accepts(grammars, constraint, "Let me call <tool_call>")


def accepts(grammars: Grammars, constraint: OutputConstraint, text: str) -> bool:
    """Whether `text` (tokenized as the model would write it) is a complete reply of `constraint`."""
    row = grammars.row(constraint)
    return all(row.accept(t) for t in grammars_tokens(text)) and bool(row.matcher.is_accepting())


def grammars_tokens(text: str) -> list[int]:
    return WorldTokenizer().encode(text)


def test_the_exact_bytes_of_calls_and_json(tokenizer: Tokenizer) -> None:
    grammars = Grammars(tokenizer, 65536)
    required = OutputConstraint("tool_calls", tools=TOOLS, tool_mode="required", parallel=False)
    good = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}</tool_call>'
    assert accepts(grammars, required, good)
    assert not accepts(grammars, required, good.replace('"city": ', '"city":'))  # whitespace is fixed
    assert not accepts(grammars, required, good.replace('", "arguments"', '","arguments"'))
    assert not accepts(grammars, required, good + "\n" + good)  # one call unless parallel
    parallel = OutputConstraint("tool_calls", tools=TOOLS, tool_mode="required", parallel=True)
    assert accepts(grammars, parallel, good + "\n" + good)
    assert not accepts(grammars, parallel, good + "\n\n" + good)
    assert not accepts(grammars, parallel, good + "\n")
    assert not accepts(grammars, required, good.replace("get_weather", "get_time"))
    assert not accepts(grammars, required, good.replace('"unit": "celsius"', '"unit": "kelvin"'))
    assert accepts(grammars, OutputConstraint("json_object"), '{"a": [1, 2], "b": {"c": null}}')
    assert not accepts(grammars, OutputConstraint("json_object"), '{"a": [1,2]}')
    assert not accepts(grammars, OutputConstraint("json_object"), '{ "a": 1}')
    assert not accepts(grammars, OutputConstraint("json_object"), ' {"a": 1}')
    spaced = OutputConstraint("json_object", leading_space=True)  # one leading space at most
    assert accepts(grammars, spaced, ' {"a": 1}') and accepts(grammars, spaced, '{"a": 1}')
    assert not accepts(grammars, spaced, '  {"a": 1}') and not accepts(grammars, spaced, '\n{"a": 1}')
    spaced_calls = OutputConstraint("tool_calls", tools=TOOLS, leading_space=True)
    assert accepts(grammars, spaced_calls, " " + good) and not accepts(grammars, required, " " + good)
    # Strict: properties the schema does not name are refused; not strict: allowed.
    schema = json.dumps(WEATHER)
    extra = '{"city": "Paris", "unit": "celsius", "x": 1}'
    assert not accepts(grammars, OutputConstraint("json_schema", schema=schema, strict=True), extra)
    assert accepts(grammars, OutputConstraint("json_schema", schema=schema), extra)
    assert accepts(grammars, OutputConstraint("grammar", grammar='start: "yes" | "no"'), "no")


def test_tokens_that_are_not_whole_utf8_are_byte_pieces(tokenizer: Tokenizer) -> None:
    grammars = Grammars(tokenizer, 65536)
    # "𝄞" is three World tokens, none of them UTF-8 on its own.
    assert [tokenizer.token_bytes(t) for t in tokenizer.encode("𝄞")] == [b"\xf0\x9d", b"\x84", b"\x9e"]
    assert accepts(grammars, OutputConstraint("json_object"), '{"clef": "𝄞 and 龘"}')
    assert accepts(grammars, OutputConstraint("json_schema", schema='{"const": "🦜"}'), '"🦜"')
    assert not accepts(grammars, OutputConstraint("json_schema", schema='{"const": "🦜"}'), '"🧬"')


def test_forced_text_is_tokenized_as_the_model_would(tokenizer: Tokenizer) -> None:
    vocab = _VocabularyBytes(tokenizer, 65536)
    assert vocab('{"name": "東京"'.encode()) == tokenizer.encode('{"name": "東京"')
    assert vocab(b"\xf0\x9d\x84") == [3318, 133]  # part of a character: greedy over bytes
    assert vocab.tokens[0].startswith(b"\xff") and vocab.tokens[1:3] == [
        tokenizer.token_bytes(1),
        tokenizer.token_bytes(2),
    ]


def test_ids_past_the_vocabulary_and_end_of_text_are_masked_until_the_end(tokenizer: Tokenizer) -> None:
    row = Grammars(tokenizer, 65600).row(OutputConstraint("json_object"))  # a model wider than its vocabulary
    row.fill()
    assert row.banned.shape == (65600,)
    assert bool(row.banned[65530:].all()) and bool(row.banned[0])
    assert not bool(row.banned[tokenizer.encode("{")[0]])
    for token in tokenizer.encode("{}"):
        assert row.accept(token)
    row.fill()
    assert row.done and (~row.banned).nonzero().view(-1).tolist() == [0]


def test_think_modes_put_a_free_block_before_the_constrained_part(tokenizer: Tokenizer) -> None:
    grammars = Grammars(tokenizer, 65536)
    opened = OutputConstraint("json_object", think="open")
    assert accepts(grammars, opened, '>Let me <b>think</b> about </thi...</think>\n\n{"a": 1}')
    assert accepts(grammars, opened, '></think>{"a": 1}')
    assert not accepts(grammars, opened, '>x</think>\n\n\n\n\n{"a": 1}')  # whitespace is bounded
    assert not accepts(grammars, opened, '>x</think></think>{"a": 1}')
    assert not accepts(grammars, opened, '{"a": 1}')
    closed = OutputConstraint("tool_calls", tools=TOOLS, think="closed")
    assert accepts(grammars, closed, '>\n<tool_call>{"name": "now", "arguments": {}}</tool_call>')
    assert not accepts(grammars, closed, '>x</think><tool_call>{"name": "now", "arguments": {}}</tool_call>')
    raw = OutputConstraint("grammar", grammar='start: "yes" | "no"', think="closed")
    assert accepts(grammars, raw, "> yes") and not accepts(grammars, raw, "yes")


async def test_a_closed_think_block_then_a_valid_value_through_the_engine(engine: Scheduler) -> None:
    # (An open block's reasoning is free text, which a random model never ends with "</think>".)
    constraint = OutputConstraint("json_schema", schema=json.dumps(SCHEMA), strict=True, think="closed")
    results = await asyncio.gather(
        *(generate(engine, constraint, sampling=sampling(seed)) for seed in range(3))
    )
    for text, finish in results:
        assert finish.reason is FinishReason.STOP, text
        assert text.startswith(">")
        jsonschema.validate(json.loads(text[1:]), strict_schema(SCHEMA))


def test_a_row_is_filled_by_one_thread_at_a_time(tokenizer: Tokenizer) -> None:
    row = Grammars(tokenizer, 65536).row(OutputConstraint("json_object"))
    seq: Any = SimpleNamespace(grammar=row, done=False, followup=None)
    gate = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        pool.submit(gate.wait)  # the helper is busy: the fill waits behind it
        start_masks([seq], pool)
        job = row.job
        start_masks([seq], pool)  # a step that sampled nothing for this row: no second fill
        assert row.job is job and not row.fresh
        gate.set()
        (masked,) = masked_rows([seq], [torch.zeros(65536)])
    assert row.fresh and row.job is None
    assert masked[tokenizer.encode("{")[0]] == 0 and masked[tokenizer.encode("a")[0]] == float("-inf")


def test_a_failing_mask_bans_everything_in_its_row_only(tokenizer: Tokenizer) -> None:
    grammars = Grammars(tokenizer, 65536)
    broken, fine = (
        grammars.row(OutputConstraint("json_object")),
        grammars.row(OutputConstraint("json_object")),
    )

    class Failing:
        def unsafe_compute_mask_ptr(self, *args: object) -> None:
            raise RuntimeError("boom")

    broken.matcher = Failing()
    seqs: Any = [SimpleNamespace(grammar=g, done=False, followup=None) for g in (broken, fine)]
    start_masks(seqs, None)
    assert bool(broken.banned.all()) and not bool(fine.banned.all())


def test_strict_schema_walks_subschemas_not_property_names() -> None:
    schema = {
        "type": "object",
        "properties": {"properties": {"type": "object", "properties": {"a": {"type": "string"}}}},
        "$defs": {"d": {"type": "object"}},
        "anyOf": [{"properties": {}}],
        "additionalProperties": True,
    }
    out = strict_schema(schema)
    assert out["additionalProperties"] is True  # said otherwise: kept
    assert set(out["properties"]) == {"properties"}
    assert out["properties"]["properties"]["additionalProperties"] is False
    assert out["$defs"]["d"]["additionalProperties"] is False
    assert out["anyOf"][0]["additionalProperties"] is False
    assert "additionalProperties" not in schema["$defs"]["d"]  # a copy


@pytest.mark.parametrize(
    ("constraint", "words"),
    [
        (OutputConstraint("json_schema", schema='{"type": "string", "pattern": "(("}'), "regex"),
        (OutputConstraint("json_schema", schema="{not json"), "not valid JSON"),
        (OutputConstraint("json_schema", schema='{"$ref": "#/nowhere"}'), "nowhere"),
        (OutputConstraint("json_schema", schema='{"type": "objekt"}'), "objekt"),
        (OutputConstraint("json_schema", schema="[1]"), "JSON object"),
        (OutputConstraint("json_schema"), "required"),
        (OutputConstraint("grammar", grammar="start: missing_rule"), "missing_rule"),
        (OutputConstraint("tool_calls"), "at least one tool"),
        (OutputConstraint("tool_calls", tools=(ToolSpec("bad name!"),)), "bad name!"),
        (
            OutputConstraint("tool_calls", tools=(ToolSpec("f", '{"type": "string", "pattern": "("}'),)),
            "regex",
        ),
    ],
)
async def test_a_constraint_that_cannot_compile_is_refused_by_submit(
    engine: Scheduler, constraint: OutputConstraint, words: str
) -> None:
    with pytest.raises(InvalidParameter, match=re.escape(words)):
        await engine.submit(GenerationRequest(prompt=PROMPT, constraint=constraint))
    assert engine.stats()["requests"] == 0


async def test_max_tokens_first_ends_with_length_mid_value(engine: Scheduler) -> None:
    constraint = OutputConstraint("json_schema", schema=json.dumps(SCHEMA))
    full, _ = await generate(engine, constraint, sampling=GREEDY)
    text, finish = await generate(engine, constraint, sampling=GREEDY, max_tokens=5)
    assert finish.reason is FinishReason.LENGTH and finish.usage.completion_tokens == 5
    assert full.startswith(text) and text != full


async def test_stop_strings_still_apply(engine: Scheduler) -> None:
    constraint = OutputConstraint("json_schema", schema=json.dumps(SCHEMA))
    text, finish = await generate(engine, constraint, sampling=GREEDY, stop=('"age"',))
    assert finish.reason is FinishReason.STOP and finish.stop_matched == '"age"'
    assert text.startswith('{"name": "') and '"age"' not in text


async def test_greedy_output_is_the_same_with_or_without_cache_and_batch(engine: Scheduler) -> None:
    constraint = OutputConstraint("json_schema", schema=json.dumps(SCHEMA))
    alone, _ = await generate(engine, constraint, sampling=GREEDY, use_prefix_cache=False)
    cached, _ = await generate(engine, constraint, sampling=GREEDY)
    again, _ = await generate(engine, constraint, sampling=GREEDY)  # its prompt state from the cache
    assert engine.stats()["cached_tokens"] > 0
    batch = await asyncio.gather(*(generate(engine, constraint, sampling=GREEDY) for _ in range(8)))
    assert [alone, cached, again, *(t for t, _ in batch)] == [alone] * 11


async def test_unconstrained_neighbours_are_unaffected(engine: Scheduler) -> None:
    prompts = [PROMPT, "User: Tell me a story.\n\nAssistant:", "Q: 2+2?\n\nA:"]
    alone = [await generate(engine, None, prompt=p, sampling=GREEDY, max_tokens=24) for p in prompts]
    constrained = OutputConstraint("json_schema", schema=json.dumps(SCHEMA))
    mixed = await asyncio.gather(
        *(generate(engine, None, prompt=p, sampling=GREEDY, max_tokens=24) for p in prompts),
        *(generate(engine, constrained, sampling=sampling(seed)) for seed in range(4)),
    )
    assert [t for t, _ in mixed[: len(prompts)]] == [t for t, _ in alone]
