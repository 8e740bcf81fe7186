"""Tool calls in replies and prompts (docs/structured-output.md#tool-calls-in-the-prompt): a reply split
into content and calls at every 2-way chunk boundary (and after the G-series think split), and the
canonical history form that makes a reply's follow-up equal to the history a client sends back."""

from __future__ import annotations

import json

import pytest

from rwkv_gateway.domain.reasoning import ThinkSplitter
from rwkv_gateway.domain.tool_calls import (
    ArgumentsDelta,
    CallEvent,
    CallOpened,
    ContentDelta,
    ToolCall,
    ToolCallSplitter,
    ToolDefinition,
    canonical_arguments,
    render_call,
    render_reply,
    split_calls,
    tools_block,
)

WEATHER = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}</tool_call>'
TRICKY = (
    '<tool_call> {"name":"say","arguments" : {"text": "a }\\" ] </tool_call> \\\\", "n": [1, {"x": null}],'
    ' "é": "日本"} }</tool_call>'
)


def streamed(chunks: list[str]) -> tuple[str, list[ToolCall]]:
    """Feed `chunks`; check the events add up to what the splitter collected."""
    splitter = ToolCallSplitter()
    events: list[CallEvent] = []
    for chunk in chunks:
        events += splitter.push(chunk)
    events += splitter.finish()
    content = "".join(e.text for e in events if isinstance(e, ContentDelta))
    calls: list[ToolCall] = []
    for event in events:
        if isinstance(event, CallOpened):
            assert event.index == len(calls)
            calls.append(ToolCall(event.name, ""))
        elif isinstance(event, ArgumentsDelta):
            assert event.text
            calls[event.index] = ToolCall(calls[event.index].name, calls[event.index].arguments + event.text)
    assert (content, calls) == (splitter.content, splitter.calls)
    return content, calls


CASES: list[tuple[str, tuple[str, list[ToolCall]]]] = [
    ("Just text. ", ("Just text.", [])),
    (WEATHER, ("", [ToolCall("get_weather", '{"city": "Paris", "unit": "c"}')])),
    (
        f"Let me look.\n{WEATHER}\n{WEATHER}",
        ("Let me look.", [ToolCall("get_weather", '{"city": "Paris", "unit": "c"}')] * 2),
    ),
    (
        TRICKY,
        ("", [ToolCall("say", '{"text": "a }\\" ] </tool_call> \\\\", "n": [1, {"x": null}], "é": "日本"}')]),
    ),
    ('<tool_call>{"name": "n", "arguments": 12}</tool_call>', ("", [ToolCall("n", "12")])),
    ('<tool_call>{"name": "s", "arguments": "x}"}</tool_call>', ("", [ToolCall("s", '"x}"')])),
    # Another key order: parsed whole when the call closes.
    ('<tool_call>{"arguments": {"a": 1}, "name": "f"}</tool_call>', ("", [ToolCall("f", '{"a": 1}')])),
    # Not a call at all: kept as content.
    ("a <tool_call>oops</tool_call> b", ("a <tool_call>oops</tool_call> b", [])),
    # Cut by the token limit: inside the arguments, before the name is clear, inside the tag.
    ('<tool_call>{"name": "f", "arguments": {"a": [1,', ("", [ToolCall("f", '{"a": [1,')])),
    ('x <tool_call>{"name": "f', ("x", [])),
    ('<tool_call>{"name": "f", "argu', ("", [])),
    ("x <tool_ca", ("x <tool_ca", [])),
    ("<tool_call_not> x", ("<tool_call_not> x", [])),
    ("", ("", [])),
]


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_every_two_way_split_gives_the_whole_reply_split(
    text: str, expected: tuple[str, list[ToolCall]]
) -> None:
    assert split_calls(text) == expected
    for cut in range(len(text) + 1):
        assert streamed([text[:cut], text[cut:]]) == expected, cut


def test_character_by_character() -> None:
    text = f"Sure. {TRICKY} {WEATHER}"
    assert streamed(list(text)) == split_calls(text)
    assert [c.name for c in split_calls(text)[1]] == ["say", "get_weather"]


def test_after_the_think_split() -> None:
    """Reasoning first (domain/reasoning.py), then the content is split into text and calls."""
    reply = f"> The user wants the weather. </think>\n{WEATHER}"
    for cut in range(len(reply) + 1):
        think = ThinkSplitter("think")
        calls = ToolCallSplitter()
        for chunk in (reply[:cut], reply[cut:]):
            calls.push(think.push(chunk)[1])
        calls.push(think.finish()[1])
        calls.finish()
        assert think.reasoning == "The user wants the weather."
        assert (calls.content, calls.calls) == split_calls(WEATHER)


@pytest.mark.parametrize(
    "arguments",
    [
        '{"city":"Paris","n":[1,2]}',
        '{\n  "city": "Paris",\n  "n": [1, 2]\n}',
        '{"city": "Paris", "n": [1, 2]}',
    ],
)
def test_history_form_is_canonical(arguments: str) -> None:
    """Whatever spacing a client resends, the turn renders the same (json.dumps of the value)."""
    assert canonical_arguments(arguments) == '{"city": "Paris", "n": [1, 2]}'
    call = render_call(ToolCall("get_weather", arguments))
    assert (
        call == '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "n": [1, 2]}}</tool_call>'
    )
    assert split_calls(call)[1] == [ToolCall("get_weather", '{"city": "Paris", "n": [1, 2]}')]


def test_non_ascii_arguments_stay_readable_and_round_trip() -> None:
    arguments = json.dumps({"city": "北京", "q": 'say "hi"\n'})
    rendered = render_reply(" Checking. ", [ToolCall("get_weather", arguments)])
    assert rendered == (
        'Checking.\n<tool_call>{"name": "get_weather", "arguments": {"city": "北京", "q": "say \\"hi\\"\\n"}}'
        "</tool_call>"
    )
    content, calls = split_calls(rendered)
    assert render_reply(content, calls) == rendered
    assert "\n\n" not in rendered


def test_cut_arguments_are_kept_as_written() -> None:
    assert canonical_arguments(' {"a": [1, ') == '{"a": [1,'


def test_tools_block_lists_each_function_on_one_line() -> None:
    block = tools_block(
        [
            ToolDefinition(
                "get_weather",
                "Weather.\n\nNow.",
                '{"type": "object", "properties": {"city": {"type": "string"}}}',
            ),
            ToolDefinition("noop"),
        ]
    )
    lines = block.split("\n")
    assert len(lines) == 4
    assert json.loads(lines[1]) == {
        "name": "get_weather",
        "description": "Weather.\n\nNow.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    }
    assert json.loads(lines[2])["name"] == "noop"
    assert "<tool_call>" in lines[3] and "<tool_response>" in lines[3]
