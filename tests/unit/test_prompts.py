"""Chat template rendering, implicit stops and reply trimming."""

from __future__ import annotations

import pytest

from rwkv_gateway.domain.prompts import ChatMessage, ChatTemplate, ReplyTrimmer


def test_world_template_keeps_every_system_message_and_collapses_blank_lines() -> None:
    messages = [
        ChatMessage("system", "Be brief."),
        ChatMessage("developer", "Answer in English."),
        ChatMessage("user", "Hello\r\n\r\n\r\nthere  "),
        ChatMessage("assistant", "Hi!"),
        ChatMessage("tool", "42"),
    ]
    assert ChatTemplate().render(messages) == (
        "System: Be brief.\n\nSystem: Answer in English.\n\nUser: Hello\nthere\n\n"
        "Assistant: Hi!\n\nUser: 42\n\nAssistant:"
    )
    kept = ChatTemplate(collapse_blank_lines=False).render([ChatMessage("user", "a\n\nb")])
    assert kept == "User: a\n\nb\n\nAssistant:"


def test_labels_and_stops_are_configurable() -> None:
    qa = ChatTemplate(user_label="Question", assistant_label="Answer", system_label="Context")
    assert qa.render([ChatMessage("user", "why?")]) == "Question: why?\n\nAnswer:"
    assert qa.stops == ("\n\nQuestion:", "\n\nContext:")
    assert ChatTemplate(stop_on_blank_line=True).stops[-1] == "\n\n"
    assert ChatTemplate().render([ChatMessage("user", "x")], add_generation_prompt=False) == "User: x\n\n"


@pytest.mark.parametrize(
    "pieces",
    [
        [" ", " Hello", " world", "  ", "\n", "!", "  \n "],
        ["   "],
        ["a"],
        ["", " a b ", "", " c"],
    ],
)
def test_trimmer_stream_equals_stripped_whole(pieces: list[str]) -> None:
    trimmer = ReplyTrimmer()
    streamed = "".join(trimmer.push(p) for p in pieces) + trimmer.flush()
    assert streamed == "".join(pieces).strip()
