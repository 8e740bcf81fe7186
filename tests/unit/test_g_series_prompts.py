"""The G-series chat template: chosen per checkpoint, its think modes and their exact prompt text
(docs/chat-prompts.md#5-g-series-think-modes)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from rwkv_gateway.domain.prompts import (
    ChatMessage,
    ChatTemplate,
    ThinkMode,
    chat_template,
    template_for_model,
)
from rwkv_gateway.engine.tokenizer import Tokenizer
from rwkv_gateway.settings import Settings
from support import model_info

OLD_G = "/models/rwkv7-g1a-0.4b-20250905-ctx4096.pth"  # before 2025-09-22: no think suffixes
NEW_G = "/models/rwkv7-g1a-1.5b-20250922-ctx4096.pth"  # from 2025-09-22: think suffixes
HISTORY = [
    ChatMessage("system", "Answer briefly."),
    ChatMessage("user", "What is RWKV?"),
    ChatMessage("assistant", "An RNN language model."),
    ChatMessage("user", "Who made it?\n\n\nTell me."),
]
TURNS = (
    "System: Answer briefly.\n\nUser: What is RWKV?\n\nAssistant: An RNN language model.\n\n"
    "User: Who made it?\nTell me"
)


@pytest.mark.parametrize(
    ("path", "choice", "expected"),
    [
        (OLD_G, "auto", ("g-series", False)),
        (NEW_G, "auto", ("g-series", True)),
        ("/m/RWKV7-G1b-2.9b-20251205-ctx8192.pth", "auto", ("g-series", True)),
        ("/m/rwkv7-g0-7.2b-20250722-ctx4096.pth", "auto", ("g-series", False)),
        ("/m/RWKV-x070-World-2.9B-v3-20250211-ctx4096.pth", "auto", ("world", False)),
        ("/m/tiny-v7.pth", "auto", ("world", False)),
        (NEW_G, "world", ("world", False)),
        ("/m/tiny-v7.pth", "g-series", ("g-series", False)),
        ("/m/my-finetune-20251001.pth", "g-series", ("g-series", True)),
    ],
)
def test_the_template_is_chosen_by_the_file_name_unless_a_setting_forces_it(
    path: str, choice: str, expected: tuple[str, bool]
) -> None:
    assert template_for_model(choice, path) == expected


def test_chat_template_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings(data_dir=tmp_path).chat_template == "auto"
    assert chat_template(Settings(data_dir=tmp_path), model_info(NEW_G)) == ChatTemplate(
        name="g-series", think_suffixes=True
    )
    monkeypatch.setenv("RWKV_GATEWAY_CHAT_TEMPLATE", "world")
    assert chat_template(Settings(data_dir=tmp_path), model_info(NEW_G)) == ChatTemplate()
    monkeypatch.setenv("RWKV_GATEWAY_CHAT_TEMPLATE", "g1")
    with pytest.raises(ValidationError):
        Settings(data_dir=tmp_path)


# The whole prompt per think mode, for a model before and one after 2025-09-22.
OLD_PROMPTS: dict[ThinkMode, str] = {
    "off": TURNS + ".\n\nAssistant:",
    "fake": TURNS + ".\n\nAssistant: <think>\n</think",
    "short": TURNS + ".\n\nAssistant: <think",
    "think": TURNS + ".\n\nAssistant: <think",
    "long": TURNS + ".\n\nAssistant: <think",
}
NEW_PROMPTS: dict[ThinkMode, str] = {
    "off": TURNS + ".\n\nAssistant:",
    "fake": TURNS + ".\n\nAssistant: <think>\n</think",
    "short": TURNS + ". think a bit\n\nAssistant: <think",
    "think": TURNS + ". think\n\nAssistant: <think",
    "long": TURNS + ". think a lot\n\nAssistant: <think",
}


@pytest.mark.parametrize("think", list(OLD_PROMPTS))
def test_g_series_prompt_text_per_think_mode(think: ThinkMode) -> None:
    old = ChatTemplate(name="g-series")
    new = ChatTemplate(name="g-series", think_suffixes=True)
    assert old.render(HISTORY, think=think) == OLD_PROMPTS[think]
    assert new.render(HISTORY, think=think) == NEW_PROMPTS[think]
    # Only the last user turn and the opening change: the history's pieces (and cached states) stay.
    assert new.segments(HISTORY, think=think)[:3] == ChatTemplate().segments(HISTORY)[:3]


@pytest.mark.parametrize("think", list(OLD_PROMPTS))
def test_world_template_ignores_think_modes(think: ThinkMode) -> None:
    assert ChatTemplate().render(HISTORY, think=think) == OLD_PROMPTS["off"]
    assert ChatTemplate(think_suffixes=True).render(HISTORY, think=think) == OLD_PROMPTS["off"]


def test_suffix_goes_only_on_a_last_user_turn() -> None:
    new = ChatTemplate(name="g-series", think_suffixes=True)
    ends_with_system = [ChatMessage("user", "Hi"), ChatMessage("system", "Be nice.")]
    assert new.render(ends_with_system, think="long") == "User: Hi\n\nSystem: Be nice.\n\nAssistant: <think"
    assert (
        new.render([ChatMessage("user", "Hi")], think="long", add_generation_prompt=False) == "User: Hi\n\n"
    )


def test_think_prompt_tokens_in_the_world_vocabulary(tokenizer: Tokenizer) -> None:
    new = ChatTemplate(name="g-series", think_suffixes=True)
    segments = new.segments([ChatMessage("user", "Hi")], think="short")
    assert segments == ("User: Hi think a bit\n\n", "Assistant: <think")
    assert [tokenizer.encode(s) for s in segments] == [
        [24281, 59, 3880, 39942, 332, 21365, 261],
        [5585, 41693, 59, 295, 35762],
    ]
    fake = new.segments([ChatMessage("user", "Hi")], think="fake")
    assert tokenizer.encode(fake[-1]) == [5585, 41693, 59, 295, 35762, 63, 11, 754, 35762]
