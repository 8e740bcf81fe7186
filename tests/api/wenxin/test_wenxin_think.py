"""wenxin on a G-series model (docs/wenxin.md#8-g-series-models): fake think by default (no reasoning
field); RWKV_GATEWAY_GLM_WENXIN_THINK=think thinks and leaves the block out of `result`, streamed or
not; history sent back without the block continues from the cached state."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import pytest
from wenxin_support import Wenxin, make_wenxin

from rwkv_gateway.domain.prompts import ChatMessage, ChatTemplate, ThinkMode
from rwkv_gateway.engine.tokenizer import Tokenizer
from support import idle

if TYPE_CHECKING:
    from tests.api.conftest import ServeFactory

QUESTION = "Who made RWKV?"
G = ChatTemplate(name="g-series")


def tokens(tokenizer: Tokenizer, segments: tuple[str, ...]) -> int:
    return sum(len(tokenizer.encode(s)) for s in segments)


async def answer(wx: Wenxin, **fields: Any) -> dict[str, Any]:
    body = {"messages": [{"role": "user", "content": QUESTION}], "max_output_tokens": 8, **fields}
    resp = await wx.chat(body)
    assert resp.status_code == 200 and "error_code" not in resp.json(), resp.text
    data: dict[str, Any] = resp.json()
    return data


def streamed(text: str) -> list[dict[str, Any]]:
    return [json.loads(line[len("data: ") :]) for line in text.splitlines() if line.startswith("data: ")]


@pytest.mark.parametrize("think", ["fake", "think"])
async def test_result_leaves_the_think_block_out(
    serve: ServeFactory, tokenizer: Tokenizer, think: ThinkMode
) -> None:
    wx = await make_wenxin(await serve(chat_template="g-series", glm_wenxin_think=think))
    out = await answer(wx)
    assert out["usage"]["prompt_tokens"] == tokens(
        tokenizer, G.segments([ChatMessage("user", QUESTION)], think=think)
    )
    resp = await wx.chat(
        {"messages": [{"role": "user", "content": QUESTION}], "max_output_tokens": 8, "stream": True}
    )
    events = streamed(resp.text)
    assert events[-1]["is_end"] is True
    text = "".join(e["result"] for e in events)
    if think == "think":
        # The random model never closes the block in 8 tokens: nothing of it reaches the client.
        assert out["result"] == "" and out["is_truncated"] is True and out["finish_reason"] == "length"
        assert text == "" and events[-1]["usage"]["completion_tokens"] == 8
    else:
        assert out["result"] and not out["result"].startswith(">") and text and not text.startswith(">")


async def test_history_without_the_think_block_continues_from_the_cache(
    serve: ServeFactory, tokenizer: Tokenizer
) -> None:
    wx = await make_wenxin(await serve(chat_template="g-series"))
    engine = wx.served.app.state.services.model.engine
    first = await answer(wx)
    await idle(engine)
    before = engine.stats()["prompt_tokens"]
    messages = [
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": first["result"]},
        {"role": "user", "content": "And when?"},
    ]
    await answer(wx, messages=messages)
    new_turn = G.segments([ChatMessage("user", "And when?")], think="fake")
    assert engine.stats()["prompt_tokens"] - before == tokens(tokenizer, new_turn)


@pytest.mark.parametrize("chat_template", ["world", "g-series"])
async def test_response_format_json_object_holds_result_to_json(
    serve: ServeFactory, chat_template: str
) -> None:
    """ERNIE's `response_format: "json_object"` (docs/wenxin.md#9-json-output): the random model's reply
    is JSON only because the grammar holds it there, after a fake think block on the G series."""
    wx = await make_wenxin(await serve(chat_template=chat_template))
    out = await answer(wx, response_format="json_object", max_output_tokens=24)
    assert out["result"].startswith("{"), out
    if not out["is_truncated"]:
        assert isinstance(json.loads(out["result"]), dict)
    resp = await wx.chat(
        {
            "messages": [{"role": "user", "content": QUESTION}],
            "max_output_tokens": 24,
            "response_format": "json_object",
            "stream": True,
        }
    )
    assert "".join(e["result"] for e in streamed(resp.text)).startswith("{")
    plain = await answer(wx, response_format="text")
    assert not plain["result"].startswith("{")


async def test_an_unknown_response_format_is_a_parameter_error(wx: Wenxin) -> None:
    resp = await wx.chat({"messages": [{"role": "user", "content": "hi"}], "response_format": "json_schema"})
    error = resp.json()
    assert resp.status_code == 200 and error["error_code"] == 336003, error
    assert "response_format" in error["error_msg"]
