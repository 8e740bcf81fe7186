"""Structured output on the sampler: an `OutputConstraint` compiled into a grammar that masks logits.

This module owns everything between a request's constraint and the tokens its row may sample, with
llguidance as the grammar engine (docs/structured-output.md#library):

- `Grammars` (one per engine) describes the vocabulary to llguidance byte for byte, compiles each
  constraint (a JSON Schema, any JSON object, a raw Lark grammar, tool calls) into a grammar, and
  keeps the compiled grammars in a bounded LRU keyed by the constraint. Compiling runs off the event
  loop at admission, so a constraint that cannot be compiled is an `InvalidParameter` from `submit`.
- `RowGrammar` (one per constrained sequence) holds the matcher and its next-token bitmask.
- `start_masks` / `masked_rows` are the scheduler's step hooks: the bitmasks of a step depend only on
  tokens already accepted, so they are filled on a helper thread while the forward runs, then applied
  to the constrained rows' logits before every other sampling filter
  (docs/structured-output.md#how-masks-are-applied). Unconstrained rows are never touched.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Executor, Future
from typing import TYPE_CHECKING, Any

import llguidance
import numpy
import torch

from rwkv_gateway.domain.constraints import (
    TOOL_CALL_BEGIN,
    TOOL_CALL_END,
    TOOL_NAME,
    OutputConstraint,
    ToolSpec,
)
from rwkv_gateway.engine.threads import on_one_thread
from rwkv_gateway.engine.tokenizer import Tokenizer
from rwkv_gateway.errors import InvalidParameter

if TYPE_CHECKING:
    from rwkv_gateway.engine.stream import GenerationSequence

__all__ = ["JSON_OPTIONS", "MAX_SCHEMA_CHARS", "Grammars", "RowGrammar", "masked_rows", "start_masks"]

logger = logging.getLogger(__name__)

#: How JSON is written under a constraint: no whitespace but one space after ":" and "," (what
#: `json.dumps` writes), so a random-weight model cannot spend its tokens on blank space
#: (docs/structured-output.md#whitespace).
JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
#: The largest schema (or grammar, or all tools' schemas together) accepted, in characters.
MAX_SCHEMA_CHARS = 64 * 1024
#: Compiled grammars kept per engine (docs/structured-output.md#limits).
CACHE_SIZE = 64
#: llguidance marks a special token (the end of text) by a leading 0xFF byte, which UTF-8 never uses.
_SPECIAL = b"\xff"
#: Schema keywords whose value is one subschema, a mapping of names to subschemas, or a list of them.
_ONE = ("items", "additionalProperties", "not", "if", "then", "else", "contains", "propertyNames")
_MAPPING = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_LIST = ("anyOf", "oneOf", "allOf", "prefixItems")


class _VocabularyBytes:
    """The vocabulary as llguidance's `TokenizerWrapper` reads it: every id's raw bytes (no merges,
    so tokens that are not whole UTF-8 are byte pieces), the end-of-text token as a special token,
    ids without bytes (padding up to the model's vocabulary) as empty tokens it never allows."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        self.eos_token_id = tokenizer.eos_token_id
        self.bos_token_id = None
        self._tokenizer = tokenizer
        tokens = [tokenizer.token_bytes(i) for i in range(vocab_size)]
        if self.eos_token_id is not None and 0 <= self.eos_token_id < vocab_size:
            tokens[self.eos_token_id] = _SPECIAL + b"<|endoftext|>"
        self.tokens = tokens
        self._ids = {raw: i for i, raw in enumerate(tokens) if raw and not raw.startswith(_SPECIAL)}
        self._longest = max(len(raw) for raw in self._ids)

    def __call__(self, text: bytes) -> list[int]:
        """Tokenize `text` as the model's tokenizer does (llguidance uses it for forced text)."""
        try:
            return self._tokenizer.encode(text.decode("utf-8"))
        except UnicodeDecodeError:
            pass
        # A piece of a character: greedy longest match over bytes, the World tokenizer's own rule.
        out: list[int] = []
        pos = 0
        while pos < len(text):
            for size in range(min(self._longest, len(text) - pos), 0, -1):
                token = self._ids.get(text[pos : pos + size])
                if token is not None:
                    out.append(token)
                    pos += size
                    break
            else:
                pos += 1  # a byte no token spells: nothing to emit for it
        return out


class Grammars:
    """The engine's grammar compiler and cache (thread-safe: admission compiles on worker threads)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, *, cache_size: int = CACHE_SIZE) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._cache_size = cache_size
        self._cache: OrderedDict[OutputConstraint, llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()
        self._lltokenizer: llguidance.LLTokenizer | None = None
        #: Grammars compiled so far (cache misses).
        self.compiled = 0

    def _vocabulary(self) -> llguidance.LLTokenizer:
        # Built on first use (about 0.1 s for 65536 tokens), on an admission worker thread.
        with self._lock:
            if self._lltokenizer is None:
                if self._tokenizer.eos_token_id is None:
                    # The grammar's end is the end-of-text token; without one no value could end.
                    raise InvalidParameter(
                        "output constraints need a tokenizer with an end-of-text token, which this "
                        "model's has not",
                        param="response_format",
                    )
                wrapper = llguidance.TokenizerWrapper(_VocabularyBytes(self._tokenizer, self.vocab_size))
                self._lltokenizer = llguidance.LLTokenizer(
                    wrapper, n_vocab=self.vocab_size, eos_token=self._tokenizer.eos_token_id
                )
            return self._lltokenizer

    def compile(self, constraint: OutputConstraint) -> llguidance.LLMatcher:
        """The compiled grammar of `constraint` (a matcher in its start state, never advanced);
        raises InvalidParameter naming what cannot be compiled. Blocking: call it off the event loop."""
        with self._lock:
            template = self._cache.get(constraint)
            if template is not None:
                self._cache.move_to_end(constraint)
                return template
        vocab = self._vocabulary()
        grammar, param = grammar_text(constraint)
        error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, vocab)
        if error:
            raise InvalidParameter(
                f"cannot use this {_WHAT[constraint.kind]}: {_one_line(messages)}", param=param
            )
        template = llguidance.LLMatcher(vocab, grammar, log_level=0)
        if template.is_error():
            raise InvalidParameter(
                f"cannot use this {_WHAT[constraint.kind]}: {_one_line([template.get_error()])}",
                param=param,
            )
        with self._lock:
            self.compiled += 1
            self._cache[constraint] = template
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return template

    def row(self, constraint: OutputConstraint) -> RowGrammar:
        """A fresh matcher for one sequence (blocking: compiles on a cache miss)."""
        return RowGrammar(self.compile(constraint).deep_copy(), self.vocab_size)


_WHAT = {
    "json_object": "response format",
    "json_schema": "JSON schema",
    "grammar": "grammar",
    "tool_calls": "tools",
}


def _one_line(messages: Sequence[str]) -> str:
    text = " ".join(m.strip() for m in messages if m.strip()) or "invalid"
    return re.sub(r"\s+", " ", text)[:500]


class RowGrammar:
    """One sequence's matcher and the tokens it may not sample next.

    Touched by one thread at a time: a helper fills the mask while the forward runs (`job`), and the
    model thread waits for that job before it fills, samples or accepts (see `start_masks`)."""

    __slots__ = ("_bits", "banned", "fresh", "job", "matcher")

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int) -> None:
        self.matcher = matcher
        #: llguidance's bitmask: token t allowed iff bit t % 32 of word t // 32 is set.
        self._bits = torch.zeros((vocab_size + 31) // 32, dtype=torch.int32)
        #: Bool [vocab_size]: True for every token the grammar forbids next.
        self.banned = torch.ones(vocab_size, dtype=torch.bool)
        #: Whether `banned` is the mask of the matcher's current state.
        self.fresh = False
        #: The helper's fill of this row, while one may be running.
        self.job: Future[None] | None = None

    def fill(self) -> None:
        """Compute `banned` for the matcher's state: the bitmask, then unpacked to one flag a token
        (here, on the helper, so that the model thread only has to apply it)."""
        if self.fresh:
            return
        try:
            self.matcher.unsafe_compute_mask_ptr(self._bits.data_ptr(), self._bits.numel() * 4)
        except Exception:
            # This row alone fails: with every token banned its sampling fails, not the batch's.
            logger.exception("computing a grammar mask failed")
            self.banned.fill_(True)
            self.fresh = True
            return
        # Little-endian words: token t is bit t % 8 of byte t // 8. numpy unpacks in one C loop
        # (a tenth of what three torch ops over the vocabulary cost).
        flags = numpy.unpackbits(self._bits.numpy().view(numpy.uint8), bitorder="little")
        numpy.equal(flags[: self.banned.shape[0]], 0, out=self.banned.numpy())
        self.fresh = True

    def wait(self) -> None:
        """Let the helper's fill of this row end (the model thread, before touching the matcher)."""
        if self.job is not None:
            self.job.result()
            self.job = None

    def accept(self, token: int) -> bool:
        """Advance past a sampled token; False if the grammar did not allow it."""
        self.wait()
        self.fresh = False
        return bool(self.matcher.consume_token(token))

    @property
    def done(self) -> bool:
        """The value is complete and nothing may follow it (only the end of text is allowed)."""
        return bool(self.matcher.is_stopped())

    @property
    def error(self) -> str | None:
        return str(self.matcher.get_error()) if self.matcher.is_error() else None


def _fill_all(rows: Sequence[RowGrammar]) -> None:
    for row in rows:
        row.fill()


def start_masks(batch: Sequence[GenerationSequence], pool: Executor | None) -> None:
    """Start filling the next-token masks of `batch`'s constrained sequences (before the forward).

    A mask depends only on the tokens a matcher has accepted, so it is computed on `pool` while the
    model thread runs the forward (without a pool: here, now). Rows already fresh cost nothing, so a
    sequence still prefilling pays for its first mask once; a row whose last fill may still run
    (its sequence sampled nothing since) is left to that fill."""
    rows = [
        s.grammar
        for s in batch
        if s.grammar is not None
        and not s.grammar.fresh
        and (s.grammar.job is None or s.grammar.job.done())
        and not s.done
        and s.followup is None
    ]
    if not rows:
        return
    if pool is None:
        _fill_all(rows)
        return
    job = pool.submit(_fill_all, rows)
    for row in rows:
        row.job = job


def masked_rows(seqs: Sequence[GenerationSequence], rows: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """`rows` (the logits of `seqs`) with every constrained row's forbidden tokens at -inf.

    Masked rows are new tensors: a row may be a cached snapshot's logits, which must stay as they are.
    The mask comes before bias, bans and penalties, all of which leave -inf where it is, so no knob
    can bring back a token the grammar forbids (docs/structured-output.md#how-masks-are-applied)."""
    at = [i for i, s in enumerate(seqs) if s.grammar is not None]
    if not at:
        return list(rows)
    grammars = [g for g in (seqs[i].grammar for i in at) if g is not None]
    for g in grammars:
        g.wait()
    _fill_all(grammars)  # any row `start_masks` did not cover (not expected, but never unmasked)
    out = list(rows)
    # Row by row and single-threaded: a vector of a vocabulary's size is too small for intra-op
    # threads to pay (see batch_sampler.py), and stacking the rows would copy them twice.
    with on_one_thread() if rows[at[0]].device.type == "cpu" else contextlib.nullcontext():
        for i, g in zip(at, grammars, strict=True):
            row = rows[i]
            out[i] = torch.where(g.banned.to(row.device, non_blocking=True), float("-inf"), row)
    return out


# ---------------------------------------------------------------------------- constraints -> grammars


#: What a G-series reply writes before the constrained part (`OutputConstraint.think`): the prompt
#: ended in `<think` ("open": free reasoning up to the first `</think>`) or in `<think>\n</think`
#: ("closed"); then up to 4 whitespace characters (docs/structured-output.md#think-blocks).
_THINK = {
    "open": 'start: ">" THINK WS? @body\nTHINK: /(?s:.*)<\\/think>/ & ~/(?s:.*)<\\/think>(?s:.+)/\n',
    "closed": 'start: ">" WS? @body\n',
}
_THINK_WS = "WS: /[ \\t\\r\\n]{1,4}/\n"


def grammar_text(constraint: OutputConstraint) -> tuple[str, str]:
    """llguidance's grammar for `constraint`, and the request parameter an error would be about."""
    body, param = _body(constraint)
    if constraint.think == "none":
        return body, param
    head = _THINK.get(constraint.think)
    if head is None:
        raise InvalidParameter(f"unknown think mode {constraint.think!r}", param=param)
    # Two grammars: the think part's, which ends in the constrained part's (`@body`).
    parts = [{"name": "think", "lark_grammar": head + _THINK_WS}, {"name": "body", "lark_grammar": body}]
    return json.dumps({"grammars": parts}), param


def _body(constraint: OutputConstraint) -> tuple[str, str]:
    kind = constraint.kind
    if kind == "json_object":
        return _json_grammar({"type": "object"}, constraint.leading_space), "response_format"
    if kind == "json_schema":
        schema = _parse_schema(constraint.schema, "response_format")
        value = strict_schema(schema) if constraint.strict else schema
        return _json_grammar(value, constraint.leading_space), "response_format"
    if kind == "grammar":
        if not constraint.grammar or not constraint.grammar.strip():
            raise InvalidParameter("the grammar is empty", param="grammar")
        if len(constraint.grammar) > MAX_SCHEMA_CHARS:
            raise InvalidParameter(
                f"the grammar is longer than {MAX_SCHEMA_CHARS} characters", param="grammar"
            )
        return llguidance.LLMatcher.grammar_from_lark(constraint.grammar), "grammar"
    if kind == "tool_calls":
        return llguidance.LLMatcher.grammar_from_lark(tool_call_lark(constraint)), "tools"
    raise InvalidParameter(f"unknown constraint kind {kind!r}", param="response_format")


def _json_grammar(schema: dict[str, Any], leading_space: bool) -> str:
    """One JSON value of `schema` (after one optional space with `leading_space`:
    docs/structured-output.md#whitespace)."""
    value = json.dumps({**schema, "x-guidance": JSON_OPTIONS}, ensure_ascii=False)
    lead = '" "? ' if leading_space else ""
    return llguidance.LLMatcher.grammar_from_lark(f"start: {lead}value\nvalue: %json {value}\n")


def _parse_schema(text: str | None, param: str) -> dict[str, Any]:
    if text is None:
        raise InvalidParameter("a JSON schema is required", param=param)
    if len(text) > MAX_SCHEMA_CHARS:
        raise InvalidParameter(f"the JSON schema is longer than {MAX_SCHEMA_CHARS} characters", param=param)
    try:
        schema = json.loads(text)
    except ValueError as exc:
        raise InvalidParameter(f"the JSON schema is not valid JSON: {exc}", param=param) from exc
    if not isinstance(schema, dict):
        raise InvalidParameter("the JSON schema must be a JSON object", param=param)
    return schema


def strict_schema(schema: Any) -> Any:
    """A copy of `schema` where every object schema that does not say otherwise has
    `additionalProperties: false` (OpenAI's strict mode; docs/structured-output.md#json-schema)."""
    if isinstance(schema, list):
        return [strict_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _ONE:
        if key in out:
            out[key] = strict_schema(out[key])
    for key in _MAPPING:
        if isinstance(out.get(key), dict):
            out[key] = {name: strict_schema(sub) for name, sub in out[key].items()}
    for key in _LIST:
        if isinstance(out.get(key), list):
            out[key] = [strict_schema(sub) for sub in out[key]]
    if (out.get("type") == "object" or "properties" in out) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def tool_call_lark(constraint: OutputConstraint) -> str:
    """The Lark grammar of a tool-call constraint (the exact bytes: domain/constraints.py).

    `required`: one call, or calls separated by "\\n" when `parallel`. `auto`: that, or any text
    that never contains the call opening (llguidance's regex intersection `&` and negation `~`).
    `none`: only such text, or nothing."""
    opening = re.escape(TOOL_CALL_BEGIN).replace("/", "\\/")
    text = f"TEXT: /(?s:.+)/ & ~/(?s:.*){opening}(?s:.*)/"
    if constraint.tool_mode == "none":
        return f"start: TEXT?\n{text}\n"
    if not constraint.tools:
        raise InvalidParameter("tool calls need at least one tool", param="tools")
    names = [tool.name for tool in constraint.tools]
    if len(set(names)) != len(names):
        raise InvalidParameter("tool names must be unique", param="tools")
    total = sum(len(tool.parameters_schema) for tool in constraint.tools)
    if total > MAX_SCHEMA_CHARS:
        raise InvalidParameter(
            f"the tools' schemas are longer than {MAX_SCHEMA_CHARS} characters", param="tools"
        )
    rules = [_tool_rule(i, tool) for i, tool in enumerate(constraint.tools)]
    calls = 'call ("\\n" call)*' if constraint.parallel else "call"
    begin, end = json.dumps(TOOL_CALL_BEGIN), json.dumps(TOOL_CALL_END)
    lead = '" "? ' if constraint.leading_space else ""
    lines = [
        f"start: {lead}calls" if constraint.tool_mode == "required" else f"start: TEXT | {lead}calls",
        f"calls: {calls}",
        f"call: {begin} ({' | '.join(f'tool_{i}' for i in range(len(rules)))}) {end}",
        *rules,
    ]
    if constraint.tool_mode == "auto":
        lines.append(text)
    return "\n".join(lines) + "\n"


def _tool_rule(i: int, tool: ToolSpec) -> str:
    if not TOOL_NAME.fullmatch(tool.name):
        raise InvalidParameter(
            f"tool name {tool.name!r} must be 1 to 64 letters, digits, '_', '.' or '-'", param="tools"
        )
    schema = _parse_schema(tool.parameters_schema, "tools")
    if tool.strict:
        schema = strict_schema(schema)
    # Our whitespace rules override any the schema asks for (x-guidance is llguidance's own key).
    schema = {**schema, "x-guidance": JSON_OPTIONS}
    head = json.dumps(f'{{"name": "{tool.name}", "arguments": ')
    return f'tool_{i}: {head} %json {json.dumps(schema, ensure_ascii=False)} "}}"'
