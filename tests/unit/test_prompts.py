"""Chat template rendering, implicit stops and reply trimming."""

from __future__ import annotations

from pathlib import Path

import pytest

from rwkv_gateway.domain.prompts import ChatMessage, ChatTemplate, ReplyTrimmer, chat_template
from rwkv_gateway.settings import Settings
from support import model_info


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


def test_every_chat_dialect_builds_its_template_from_the_chat_settings(tmp_path: Path) -> None:
    model = model_info("/models/tiny-v7.pth")
    settings = Settings(
        data_dir=tmp_path,
        chat_system_label="Context",
        chat_user_label="Question",
        chat_assistant_label="Answer",
        chat_collapse_blank_lines=False,
        chat_stop_on_blank_line=True,
    )
    assert chat_template(settings, model) == ChatTemplate(
        system_label="Context",
        user_label="Question",
        assistant_label="Answer",
        collapse_blank_lines=False,
        stop_on_blank_line=True,
    )
    assert chat_template(Settings(data_dir=tmp_path), model) == ChatTemplate()
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
