"""OpenAI `tools`, `tool_choice` and `parallel_tool_calls` -> the tools block of the prompt and the
request's tool-call constraint; chat history with calls and results -> prompt turns (docs/openai.md#tools).

`tool_choice` "none" keeps the tools in the prompt (as vLLM does by default) and holds the reply to
text without calls; "auto" (the default with tools) lets the model answer or call; "required" and a named
function make the whole reply calls. The prompt forms are domain/tool_calls.py's.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from rwkv_gateway.api.openai.schemas import ChatCompletionRequest, ChatMessageIn
from rwkv_gateway.domain.constraints import TOOL_NAME, OutputConstraint, ToolSpec
from rwkv_gateway.domain.prompts import ChatMessage
from rwkv_gateway.domain.tool_calls import (
    ToolCall,
    ToolDefinition,
    render_reply,
    render_tool_result,
    tools_block,
)
from rwkv_gateway.errors import InvalidParameter

ToolChoice = Literal["none", "auto", "required"]


@dataclass(frozen=True, slots=True)
class ToolUse:
    """What a chat request's tools mean for its prompt and its reply."""

    definitions: tuple[ToolDefinition, ...] = ()
    choice: ToolChoice = "none"
    #: The tool-call constraint; None when the reply cannot call (no tools, or tool_choice "none").
    constraint: OutputConstraint | None = None

    @property
    def active(self) -> bool:
        """Whether the reply may call, and so is parsed for calls."""
        return self.constraint is not None

    @property
    def prompt_block(self) -> str | None:
        """The tools block: whenever there are tools, "none" included, so that the prompt of an agent
        loop keeps its prefix (and cached states) whichever tool_choice each step uses."""
        return tools_block(self.definitions) if self.definitions else None

    @property
    def text_constraint(self) -> OutputConstraint | None:
        """With tools under "none": text that never writes a call, though the prompt offers them."""
        return OutputConstraint(kind="tool_calls", tool_mode="none") if self.definitions else None


def _bad_tools(message: str) -> InvalidParameter:
    return InvalidParameter(message, param="tools")


def _definition(i: int, tool: object) -> ToolDefinition:
    if not isinstance(tool, dict) or tool.get("type") != "function":
        raise _bad_tools(f"tools[{i}] must be an object with type 'function'")
    function = tool.get("function")
    if not isinstance(function, dict):
        raise _bad_tools(f"tools[{i}].function must be an object")
    name = function.get("name")
    if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
        raise _bad_tools(
            f"tools[{i}].function.name must be 1 to 64 letters, digits, '_', '.' or '-', got {name!r}"
        )
    description = function.get("description", "")
    if not isinstance(description, str):
        raise _bad_tools(f"tools[{i}].function.description must be a string")
    parameters = function.get("parameters", {"type": "object", "properties": {}})
    if not isinstance(parameters, dict):
        raise _bad_tools(f"tools[{i}].function.parameters must be a JSON Schema object")
    strict = function.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise _bad_tools(f"tools[{i}].function.strict must be a boolean")
    return ToolDefinition(name, description, json.dumps(parameters, ensure_ascii=False), bool(strict))


def _definitions(tools: object) -> tuple[ToolDefinition, ...]:
    if tools is None:
        return ()
    if not isinstance(tools, list):
        raise _bad_tools("tools must be a list of functions")
    definitions = tuple(_definition(i, tool) for i, tool in enumerate(tools))
    names = [d.name for d in definitions]
    if len(set(names)) != len(names):
        raise _bad_tools("tools must not name a function twice")
    return definitions


def _choice(value: Any, definitions: Sequence[ToolDefinition]) -> tuple[ToolChoice, str | None]:
    """(mode, the named function if any)."""
    if value is None:
        return ("auto" if definitions else "none"), None
    if value in ("none", "auto", "required"):
        mode: ToolChoice = value
        if mode == "required" and not definitions:
            raise InvalidParameter("tool_choice 'required' needs tools", param="tool_choice")
        return mode, None
    function = value.get("function") if isinstance(value, dict) and value.get("type") == "function" else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise InvalidParameter(
            "tool_choice must be 'none', 'auto', 'required' or "
            '{"type": "function", "function": {"name": ...}}',
            param="tool_choice",
        )
    if name not in {d.name for d in definitions}:
        raise InvalidParameter(f"tool_choice names {name!r}, which is not in tools", param="tool_choice")
    return "required", name


def tool_use(req: ChatCompletionRequest) -> ToolUse:
    for legacy in ("functions", "function_call"):
        if getattr(req, legacy) is not None:
            raise InvalidParameter(f"{legacy} is not supported: use tools and tool_choice", param=legacy)
    definitions = _definitions(req.tools)
    choice, named = _choice(req.tool_choice, definitions)
    if choice == "none" or not definitions:
        return ToolUse(definitions)
    offered = [d for d in definitions if named is None or d.name == named]
    constraint = OutputConstraint(
        kind="tool_calls",
        tools=tuple(ToolSpec(d.name, d.parameters, d.strict) for d in offered),
        tool_mode=choice,
        parallel=req.parallel_tool_calls is not False,
    )
    return ToolUse(definitions, choice, constraint)


def _arguments(value: str | dict[str, Any]) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _message(m: ChatMessageIn) -> ChatMessage:
    if m.role == "assistant" and m.tool_calls:
        calls = [ToolCall(c.function.name, _arguments(c.function.arguments)) for c in m.tool_calls]
        return ChatMessage("assistant", render_reply(m.text(), calls))
    if m.role in ("tool", "function"):
        # The template reads tool results as user turns (docs/openai.md#tools).
        return ChatMessage("tool", render_tool_result(m.text()))
    return ChatMessage(m.role, m.text())


def chat_messages(messages: Sequence[ChatMessageIn], prompt_block: str | None = None) -> list[ChatMessage]:
    """The conversation as template messages; the tools block (if any) is a system turn after the
    leading system messages, so it sits in the prefix every later turn of the conversation shares."""
    try:
        out = [_message(m) for m in messages]
    except ValueError as exc:
        raise InvalidParameter(str(exc), param="messages") from None
    if prompt_block is not None:
        at = next((i for i, m in enumerate(out) if m.role not in ("system", "developer")), len(out))
        out.insert(at, ChatMessage("system", prompt_block))
    return out
