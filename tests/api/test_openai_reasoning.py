"""OpenAI `reasoning_effort` on a G-series template: the prompt it picks, and the reply split into
`reasoning_content` and `content` (docs/openai.md#reasoning). The tiny test model writes nothing
sensible, so a logit bias makes it write `>` only: all of it is reasoning in a think mode (the
block never closes, as when max_tokens cuts it), all of it is content (less the first `>`) in fake think.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from rwkv_gateway.domain.prompts import ChatMessage, ChatTemplate, ThinkMode
from rwkv_gateway.engine.tokenizer import Tokenizer
from support import idle

if TYPE_CHECKING:  # the fixtures' types (conftest modules are not importable by name at run time)
    from conftest import Served, ServeFactory

CHAT = "/v1/chat/completions"
GT = 63  # ">" in the World vocabulary
QUESTION = "Who made RWKV?"


def body(**fields: Any) -> dict[str, Any]:
    return {
        "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": 5,
        "logit_bias": {str(GT): 100},
        "seed": 1,
        **fields,
    }


def chunks(resp: httpx.Response) -> list[dict[str, Any]]:
    payloads = [line[len("data: ") :] for line in resp.text.splitlines() if line.startswith("data: ")]
    assert payloads[-1] == "[DONE]"
    return [json.loads(p) for p in payloads[:-1]]


def prompt_tokens(tokenizer: Tokenizer, template: ChatTemplate, think: ThinkMode) -> int:
    segments = template.segments([ChatMessage("user", QUESTION)], think=think)
    return sum(len(tokenizer.encode(s)) for s in segments)


@pytest.fixture
async def g_series(serve: ServeFactory) -> Served:
    return await serve(chat_template="g-series")


@pytest.mark.parametrize(
    ("effort", "think"),
    [("none", "fake"), ("minimal", "fake"), ("low", "short"), ("medium", "think"), ("high", "long")],
)
async def test_reasoning_effort_picks_the_think_mode(
    g_series: Served, tokenizer: Tokenizer, effort: str, think: ThinkMode
) -> None:
    resp = await g_series.client.post(CHAT, json=body(reasoning_effort=effort))
    assert resp.status_code == 200, resp.text
    out = resp.json()
    # tiny-v7.pth carries no date: the G-series opening without the length suffix.
    assert out["usage"]["prompt_tokens"] == prompt_tokens(tokenizer, ChatTemplate(name="g-series"), think)
    message = out["choices"][0]["message"]
    assert out["choices"][0]["finish_reason"] == "length"
    if think == "fake":
        assert message["content"] == ">>>>" and "reasoning_content" not in message
        assert out["usage"]["completion_tokens_details"] == {"reasoning_tokens": 0}
    else:
        # Cut by max_tokens inside the think block: all reasoning (less the `>` closing `<think`).
        assert message["content"] == "" and message["reasoning_content"] == ">>>>"
        assert out["usage"]["completion_tokens_details"] == {"reasoning_tokens": 5}


async def test_streamed_reasoning_goes_to_delta_reasoning_content(g_series: Served) -> None:
    fields = {"reasoning_effort": "high", "stream": True, "stream_options": {"include_usage": True}}
    resp = await g_series.client.post(CHAT, json=body(**fields))
    assert resp.status_code == 200
    events = chunks(resp)
    deltas = [c["choices"][0]["delta"] for c in events if c["choices"]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert "".join(d.get("reasoning_content", "") for d in deltas) == ">>>>"
    assert "".join(d.get("content", "") for d in deltas) == ""
    assert events[-1]["usage"]["completion_tokens_details"] == {"reasoning_tokens": 5}
    plain = (await g_series.client.post(CHAT, json=body(reasoning_effort="high"))).json()
    assert plain["choices"][0]["message"]["reasoning_content"] == ">>>>"


async def test_no_effort_is_the_plain_prompt_unless_the_server_sets_a_default(
    serve: ServeFactory, tokenizer: Tokenizer
) -> None:
    plain = await serve(chat_template="g-series")
    out = (await plain.client.post(CHAT, json=body())).json()
    assert out["choices"][0]["message"]["content"] == ">>>>>"
    assert "reasoning_content" not in out["choices"][0]["message"]
    assert out["usage"]["prompt_tokens"] == prompt_tokens(tokenizer, ChatTemplate(), "off")
    thinking = await serve(chat_template="g-series", default_reasoning_effort="medium")
    out = (await thinking.client.post(CHAT, json=body())).json()
    assert out["choices"][0]["message"]["reasoning_content"] == ">>>>"
    out = (await thinking.client.post(CHAT, json=body(reasoning_effort="minimal"))).json()
    assert out["choices"][0]["message"]["content"] == ">>>>"


async def test_world_models_accept_and_ignore_reasoning_effort(served: Served) -> None:
    with_effort = (await served.client.post(CHAT, json=body(reasoning_effort="high"))).json()
    without = (await served.client.post(CHAT, json=body())).json()
    assert with_effort["choices"][0]["message"] == without["choices"][0]["message"]
    assert with_effort["choices"][0]["message"]["content"] == ">>>>>"
    assert with_effort["usage"]["prompt_tokens"] == without["usage"]["prompt_tokens"]
    assert with_effort["usage"]["completion_tokens_details"] == {"reasoning_tokens": 0}


async def test_bad_reasoning_effort_is_a_400(served: Served) -> None:
    resp = await served.client.post(CHAT, json=body(reasoning_effort="extreme"))
    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == "reasoning_effort"


@pytest.mark.parametrize(("effort", "think"), [("none", "fake"), ("medium", "think"), (None, "off")])
async def test_history_resent_without_the_think_block_prefills_only_the_new_turn(
    g_series: Served, tokenizer: Tokenizer, effort: str | None, think: ThinkMode
) -> None:
    """The state kept after a thinking reply is the history as the client resends it (answer only),
    so the next turn prefills its own pieces and nothing else
    (docs/chat-prompts.md#7-resent-history-after-thinking)."""
    fields = {} if effort is None else {"reasoning_effort": effort}
    first = await g_series.client.post(CHAT, json=body(**fields))
    assert first.status_code == 200, first.text
    answer = first.json()["choices"][0]["message"]["content"]
    assert answer == ("" if think == "think" else ">>>>" if think == "fake" else ">>>>>")
    await idle(g_series.app.state.services.model.engine)

    follow = "And when?"
    messages = [
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": follow},
    ]
    second = await g_series.client.post(CHAT, json=body(messages=messages, **fields))
    assert second.status_code == 200, second.text
    usage = second.json()["usage"]
    template = ChatTemplate(name="g-series")
    whole = template.segments([ChatMessage(m["role"], m["content"]) for m in messages], think=think)
    assert usage["prompt_tokens"] == sum(len(tokenizer.encode(s)) for s in whole)
    new_turn = template.segments([ChatMessage("user", follow)], think=think)
    prefilled = usage["prompt_tokens"] - usage["prompt_tokens_details"]["cached_tokens"]
    assert prefilled == sum(len(tokenizer.encode(s)) for s in new_turn)
