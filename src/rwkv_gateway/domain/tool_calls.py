"""Tool calls in chat prompts and replies: the tools block, earlier calls and results as history, and a
reply split into content and calls, chunk by chunk (docs/structured-output.md#tool-calls-in-the-prompt).

A call is written `<tool_call>{"name": "NAME", "arguments": {...}}</tool_call>` (domain/constraints.py),
the form the engine's grammar makes the model write. History renders every call in one canonical form
(the arguments re-serialised with `json.dumps`), so a reply's follow-up and the history a client sends
back give the same prompt text whether the client resends our argument text as it was (the openai SDK)
or re-serialises the parsed arguments (LangChain): the prefix cache then prefills only the new turn.
`ToolCallSplitter` splits a streamed reply into content and calls at any chunk boundary, like
domain/reasoning.py's `ThinkSplitter` does for the think block (which runs first).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

from rwkv_gateway.domain.constraints import TOOL_CALL_BEGIN, TOOL_CALL_END
from rwkv_gateway.domain.prompts import ReplyTrimmer, partial_tag

TOOL_RESPONSE_BEGIN = "<tool_response>"
TOOL_RESPONSE_END = "</tool_response>"

# The call's opening up to its arguments value: `{"name": "NAME", "arguments": `.
_HEADER = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*')
_SCALAR_END = frozenset(",}] \t\r\n")


@dataclass(frozen=True, slots=True)
class ToolDefinition:
    """A function offered to the model, as the prompt's tools block lists it."""

    name: str
    description: str = ""
    #: The parameters' JSON Schema as JSON text.
    parameters: str = '{"type": "object", "properties": {}}'
    #: OpenAI's `function.strict` (the engine's `ToolSpec.strict`); not shown in the prompt.
    strict: bool = False


@dataclass(frozen=True, slots=True)
class ToolCall:
    name: str
    #: The arguments as JSON text (as the model wrote them, or as a client sent them back).
    arguments: str


def _dumps(value: object) -> str:
    return json.dumps(value, ensure_ascii=False)


def canonical_arguments(arguments: str) -> str:
    """Arguments in the one form history uses (`json.dumps` of the parsed value); text that is not
    JSON (a call cut short by the token limit) is kept as it is, trimmed."""
    try:
        return _dumps(json.loads(arguments))
    except ValueError:
        return arguments.strip()


def render_call(call: ToolCall) -> str:
    arguments = canonical_arguments(call.arguments)
    return f'{TOOL_CALL_BEGIN}{{"name": {_dumps(call.name)}, "arguments": {arguments}}}{TOOL_CALL_END}'


def render_reply(content: str, calls: Sequence[ToolCall]) -> str:
    """An assistant turn's text: its content, then one call per line."""
    lines = [render_call(c) for c in calls]
    if content.strip():
        lines.insert(0, content.strip())
    return "\n".join(lines)


def render_tool_result(content: str) -> str:
    """A tool result as the text of its (user-labelled) turn."""
    return f"{TOOL_RESPONSE_BEGIN}{content.strip()}{TOOL_RESPONSE_END}"


def tools_block(tools: Sequence[ToolDefinition]) -> str:
    """The system turn that offers `tools` and says how to call them. It does not depend on
    tool_choice, so an agent loop that changes tool_choice keeps its cached prefix."""
    lines = ["You can call these functions, described one per line:"]
    for tool in tools:
        described = {
            "name": tool.name,
            "description": tool.description,
            "parameters": json.loads(tool.parameters),
        }
        lines.append(_dumps(described))
    lines.append(
        f'To call a function, answer with {TOOL_CALL_BEGIN}{{"name": "FUNCTION NAME", "arguments": '
        f"{{ARGUMENTS AS JSON}}}}{TOOL_CALL_END}, once per call. Each result comes back as "
        f"{TOOL_RESPONSE_BEGIN}RESULT{TOOL_RESPONSE_END}."
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------------- parsing replies


@dataclass(frozen=True, slots=True)
class ContentDelta:
    text: str


@dataclass(frozen=True, slots=True)
class CallOpened:
    """A call starts: its index among the reply's calls and the function's name."""

    index: int
    name: str


@dataclass(frozen=True, slots=True)
class ArgumentsDelta:
    index: int
    text: str


CallEvent = ContentDelta | CallOpened | ArgumentsDelta


class _ValueScanner:
    """Finds where one JSON value ends, one character at a time (strings, escapes, nesting)."""

    def __init__(self) -> None:
        self.started = False
        self.done = False
        self._depth = 0
        self._in_string = False
        self._escape = False
        self._scalar = False

    def feed(self, text: str) -> int:
        """How many characters of `text` belong to the value (all of them unless it ends inside)."""
        for i, c in enumerate(text):
            if not self.started:
                if c.isspace():
                    continue
                self.started = True
                if c == '"':
                    self._in_string = True
                elif c in "{[":
                    self._depth = 1
                else:
                    self._scalar = True
                continue
            if self._scalar:
                if c in _SCALAR_END:
                    self.done = True
                    return i
            elif self._in_string:
                if self._escape:
                    self._escape = False
                elif c == "\\":
                    self._escape = True
                elif c == '"':
                    self._in_string = False
                    if self._depth == 0:
                        self.done = True
                        return i + 1
            elif c == '"':
                self._in_string = True
            elif c in "{[":
                self._depth += 1
            elif c in "}]":
                self._depth -= 1
                if self._depth == 0:
                    self.done = True
                    return i + 1
        return len(text)


class ToolCallSplitter:
    """Splits a reply into content and tool calls, streamed.

    Text outside `<tool_call>...</tool_call>` is content, trimmed as a plain reply is; text that might
    be the start of `<tool_call>` is held until the next chunk decides. Inside a call, the name is
    announced (`CallOpened`) once the opening up to the arguments is complete, and the arguments value
    is passed on as it arrives (`ArgumentsDelta`), so the pieces add up to the value's exact text. A
    call whose opening does not have that shape is parsed as JSON when it closes; one that still
    does not name a function stays in the content as written. A call cut short (the token limit) keeps
    the arguments that arrived, or is dropped if its name was not complete.
    """

    def __init__(self) -> None:
        self._trim = ReplyTrimmer()
        self._held = ""
        self._in_call = False
        self._call = ""  # the current call's text not consumed yet
        self._scanner: _ValueScanner | None = None  # set once the call's name is known
        self.content = ""
        self.calls: list[ToolCall] = []

    def push(self, text: str) -> list[CallEvent]:
        events: list[CallEvent] = []
        text = self._held + text
        self._held = ""
        while text:
            if self._in_call:
                text = self._in_call_text(text, events)
                continue
            start = text.find(TOOL_CALL_BEGIN)
            if start < 0:
                keep = partial_tag(text, TOOL_CALL_BEGIN)
                self._content(text[: len(text) - keep], events)
                self._held = text[len(text) - keep :]
                break
            self._content(text[:start], events)
            self._in_call, self._call, self._scanner = True, "", None
            text = text[start + len(TOOL_CALL_BEGIN) :]
        return events

    def finish(self) -> list[CallEvent]:
        """End of the reply: a held partial tag is content; a call cut off before its name was
        complete (the token limit) is dropped, as it cannot be reported as a call."""
        events: list[CallEvent] = []
        if not self._in_call and self._held:
            self._content(self._held, events)
        self._held = self._call = ""
        self._in_call = False
        self._trim.flush()
        return events

    def _content(self, text: str, events: list[CallEvent]) -> None:
        if text and (out := self._trim.push(text)):
            self.content += out
            events.append(ContentDelta(out))

    def _in_call_text(self, text: str, events: list[CallEvent]) -> str:
        """Consume text inside a call; return what follows the call's end (empty while it is open)."""
        if self._scanner is None:
            self._call += text
            header = _HEADER.match(self._call)
            if header is None:
                # Not a recognisable opening (yet): wait for more, or for the end of the call.
                end = self._call.find(TOOL_CALL_END)
                if end < 0:
                    return ""
                body, rest = self._call[:end], self._call[end + len(TOOL_CALL_END) :]
                self._whole_call(body, events)
                return rest
            self._trim.flush()  # whitespace before a call is not content
            index = len(self.calls)
            self.calls.append(ToolCall(json.loads(header.group(1)), ""))
            events.append(CallOpened(index, self.calls[index].name))
            self._scanner = _ValueScanner()
            text, self._call = self._call[header.end() :], ""
        scanner = self._scanner
        if not scanner.done:
            n = scanner.feed(text)
            self._arguments(text[:n], events)
            text = text[n:]
            if not scanner.done:
                return ""
        # After the value: the wrapper's `}` and the closing tag.
        self._call += text
        end = self._call.find(TOOL_CALL_END)
        if end < 0:
            return ""
        rest = self._call[end + len(TOOL_CALL_END) :]
        self._in_call, self._call, self._scanner = False, "", None
        return rest

    def _arguments(self, text: str, events: list[CallEvent]) -> None:
        if not text:
            return
        index = len(self.calls) - 1
        call = self.calls[index]
        if not call.arguments:
            text = text.lstrip()
            if not text:
                return
        self.calls[index] = ToolCall(call.name, call.arguments + text)
        events.append(ArgumentsDelta(index, text))

    def _whole_call(self, body: str, events: list[CallEvent]) -> None:
        try:
            value = json.loads(body)
        except ValueError:
            value = None
        name = value.get("name") if isinstance(value, dict) else None
        if not isinstance(value, dict) or not isinstance(name, str):
            self._content(f"{TOOL_CALL_BEGIN}{body}{TOOL_CALL_END}", events)
        else:
            self._trim.flush()
            arguments = value.get("arguments", {})
            index = len(self.calls)
            self.calls.append(ToolCall(name, arguments if isinstance(arguments, str) else _dumps(arguments)))
            events.append(CallOpened(index, name))
            if self.calls[index].arguments:
                events.append(ArgumentsDelta(index, self.calls[index].arguments))
        self._in_call, self._call, self._scanner = False, "", None


def split_calls(text: str) -> tuple[str, list[ToolCall]]:
    """The (content, calls) of a whole reply."""
    splitter = ToolCallSplitter()
    splitter.push(text)
    splitter.finish()
    return splitter.content, splitter.calls
