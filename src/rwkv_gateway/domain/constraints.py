"""What a constrained generation must keep its output inside (structured output and tool calls).

Dialects say *what* (a JSON object, a value of a JSON Schema, a raw grammar, a tool call from a
list); the engine (`engine/grammar.py`) says *how*, by compiling this into a grammar matcher that
masks the sampler's logits at every step. Nothing here imports the grammar library. See
docs/structured-output.md.

A tool call is written in the model's output as

    <tool_call>{"name": "NAME", "arguments": {...}}</tool_call>

one per call (several in a row when parallel calls are allowed). `domain/tool_calls.py` renders
earlier calls into the prompt in exactly this form and parses it out of replies. The exact bytes the
engine's grammar allows (docs/structured-output.md#tool-calls):

- `<tool_call>{"name": "` NAME `", "arguments": ` ARGS `}</tool_call>`: one space after each of the
  two colons and after the comma, nothing else between the parts;
- ARGS is the arguments object as `json.dumps(args, ensure_ascii=False)` writes it: `", "` between
  items, `": "` after keys, no other whitespace outside strings (non-ASCII characters may come raw
  or as `\\uXXXX` escapes; keys in the order the model chose, which follows the schema's order
  for the properties it names);
- parallel calls are separated by exactly one `"\\n"`, with nothing before the first or after the last.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

TOOL_CALL_BEGIN = "<tool_call>"
TOOL_CALL_END = "</tool_call>"

#: Tool names as OpenAI allows them (and dots); anything else could not be written into a grammar verbatim.
TOOL_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")

ConstraintKind = Literal["json_object", "json_schema", "grammar", "tool_calls"]


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """One callable function: its name and its parameters' JSON Schema (as JSON text)."""

    name: str
    parameters_schema: str = '{"type": "object"}'
    #: OpenAI's `function.strict`: objects of the schema get `additionalProperties: false` where
    #: they do not say otherwise.
    strict: bool = False


@dataclass(frozen=True, slots=True)
class OutputConstraint:
    """One request's output constraint. Frozen and hashable, so compiled grammars can be cached on it.

    - `json_object`: one JSON object, any keys.
    - `json_schema`: one JSON value valid against `schema` (JSON text); `strict` as OpenAI's flag
      (both are enforced; strict additionally forbids properties the schema does not name).
    - `grammar`: `grammar` is a raw grammar in the engine's syntax (docs/structured-output.md).
    - `tool_calls`: with `tool_mode="required"` the whole reply is one or more calls (one only
      unless `parallel`); with `"auto"` the reply is either plain text or calls; with `"none"` it is
      plain text that never opens a call (the prompt may still list the tools; `tools` may be empty).

    The reply ends when the constrained value is complete (`Finish.reason` "stop"); `max_tokens`
    hit first ends it with "length" and the value is partial.
    """

    kind: ConstraintKind
    schema: str | None = None
    strict: bool = False
    grammar: str | None = None
    tools: tuple[ToolSpec, ...] = ()
    tool_mode: Literal["auto", "required", "none"] = "required"
    parallel: bool = True
    #: Allow one space before the JSON value or the first call (not for `grammar`). After a chat
    #: prompt's `Assistant:` RWKV models begin with a space-led token (` {`), so forbidding the space
    #: pushes a real model off its habit; dialects that strip the reply may turn this on.
    leading_space: bool = False
    #: What the reply writes before the constrained part, for G-series think modes
    #: (docs/chat-prompts.md#5-g-series-think-modes; `domain/reasoning.constraint_after_think`).
    #: "open": the prompt ended inside a think block
    #: (`Assistant: <think`), so the reply is `>`, reasoning that never contains `</think>`,
    #: `</think>`, optional whitespace, then the constrained part. "closed": the prompt closed an empty
    #: block (`Assistant: <think>\n</think`), so the reply is `>`, optional whitespace, then the
    #: constrained part. "none": the constrained part from the first token.
    think: Literal["none", "open", "closed"] = "none"
