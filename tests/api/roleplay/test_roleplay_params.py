"""Coercion of role-play parameters (docs/roleplay.md#2-parameters), without a server."""

from __future__ import annotations

import math

from rwkv_gateway.api.roleplay.params import Params
from rwkv_gateway.services.roleplay_prompts import sampling_params, valid_name


def form(**fields: str) -> Params:
    return Params({}, fields, {})


def test_spec_vectors() -> None:
    assert form(use_qa="false").flag("use_qa") is True
    assert form(use_qa="0").flag("use_qa") is True
    assert form(use_qa="").flag("use_qa") is False
    assert form().flag("use_qa") is False
    assert form(log_index="1.0").integer("log_index") == 0
    assert form(log_index=" +2 ").integer("log_index") == 2
    assert form(log_index="0.5").integer("log_index") == 0
    assert form().integer("log_index") == 0
    assert sampling_params(temperature=form(temperature="abc").number("temperature")).temperature == 1.2


def test_floats_follow_python_float() -> None:
    assert form(tau=" 1e1 ").number("tau") == 10.0
    assert form(tau="-2.5").number("tau") == -2.5
    assert form(tau="").number("tau") is None
    # NaN and infinities parse in Python but are treated as unparsable (the default applies).
    for bad in ("nan", "inf", "-Infinity"):
        assert form(tau=bad).number("tau") is None


def test_text_fields_are_raw_and_query_wins() -> None:
    assert form(prompt="  hi \n").text("prompt") == "  hi \n"
    assert form().text("prompt") is None
    params = Params({"character_name": "q"}, {"character_name": "f"}, {"character_name": "j"})
    assert params.text("character_name") == "q"
    assert Params({}, {"character_name": "f"}, {"character_name": "j"}).text("character_name") == "f"


def test_json_typing() -> None:
    body = Params(
        {}, {}, {"tau": 2, "log_index": 2.0, "use_qa": False, "prompt": 12, "bot": None, "x": [1], "t": 1.5}
    )
    assert body.number("tau") == 2.0
    assert body.integer("log_index") == 2
    assert Params({}, {}, {"log_index": 1.5}).integer("log_index") == 0
    assert body.flag("use_qa") is False
    assert body.text("prompt") == "12" and body.text("t") == "1.5"
    assert body.text("bot") is None and body.text("x") is None


def test_stream_flag() -> None:
    assert form().streaming() is True
    for off in ("0", "false", "No", "OFF"):
        assert form(stream=off).streaming() is False
    assert form(stream="1").streaming() is True
    assert Params({}, {}, {"stream": False}).streaming() is False


def test_names() -> None:
    assert valid_name("小雪") == "小雪"
    assert valid_name("e\u0301") == "\u00e9"  # NFC
    for bad in ("", ".", "..", "a/b", "a\\b", "a\x00", "a\nb", "x" * 65, None):
        assert valid_name(bad) is None
    assert math.isclose(sampling_params(presence_penalty=0.5).repetition_penalty, 1.5)
