"""ChatGLM on a G-series model (docs/glm.md#8-g-series-models): no reasoning field, so fake think by
default; RWKV_GATEWAY_GLM_WENXIN_THINK=think thinks and leaves the block out of `content`. The answer
is the one the OpenAI route gives for the same mode (its `content`), streamed or not, and history sent
back without the block continues from the cached state."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
from glmwire import stream_chat

from rwkv_gateway.api.glm.schemas import GLMChatRequest
from rwkv_gateway.api.glm.serving import GLMChat
from rwkv_gateway.domain.prompts import ChatMessage, ChatTemplate, ThinkMode
from rwkv_gateway.engine.tokenizer import Tokenizer
from support import idle

if TYPE_CHECKING:
    from conftest import Served, ServeFactory

QUESTION = "Who made RWKV?"
MAX_NEW = 8
EFFORT: dict[ThinkMode, str] = {"fake": "none", "think": "medium"}


async def glm_chat(served: Served, **body: Any) -> dict[str, Any]:
    resp = await served.client.post("/chat", json={"temperature": 0, **body})
    assert resp.status_code == 200, resp.text
    data: dict[str, Any] = resp.json()
    return data


async def openai_message(served: Served, think: ThinkMode) -> dict[str, Any]:
    body = {
        "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": MAX_NEW,
        "temperature": 0,
        "reasoning_effort": EFFORT[think],
    }
    resp = await served.client.post("/v1/chat/completions", json=body)
    assert resp.status_code == 200, resp.text
    message: dict[str, Any] = resp.json()["choices"][0]["message"]
    return message


@pytest.mark.parametrize(("setting", "think"), [(None, "fake"), ("think", "think"), ("off", "off")])
async def test_the_setting_picks_the_prompt(
    serve: ServeFactory, setting: str | None, think: ThinkMode
) -> None:
    served = await serve(
        chat_template="g-series", **({} if setting is None else {"glm_wenxin_think": setting})
    )
    engine, settings = served.app.state.services.model.engine, served.app.state.services.settings
    request, _ = await GLMChat(engine, settings, GLMChatRequest(prompt=QUESTION)).engine_request()
    template = ChatTemplate(name="g-series")
    assert request.prompt_segments == template.segments([ChatMessage("user", QUESTION)], think=think)
    assert (
        request.prompt_segments[-1]
        == {
            "fake": "Assistant: <think>\n</think",
            "think": "Assistant: <think",
            "off": "Assistant:",
        }[think]
    )


@pytest.mark.parametrize("think", ["fake", "think"])
async def test_content_is_the_answer_without_the_think_block(serve: ServeFactory, think: ThinkMode) -> None:
    served = await serve(chat_template="g-series", glm_wenxin_think=think, max_new_tokens=MAX_NEW)
    message = await openai_message(served, think)
    await idle(served.app.state.services.model.engine)
    one_shot = await glm_chat(served, prompt=QUESTION)
    streamed = await stream_chat(served.client, {"prompt": QUESTION, "temperature": 0})
    assert one_shot["content"] == message["content"] == streamed.content
    if think == "think":
        # The random model never closes the block in 8 tokens: all of it is reasoning, none of it text.
        assert message["reasoning_content"] and one_shot["content"] == ""
        assert streamed.events == [] and one_shot["completion_tokens"] == 0
    else:
        assert one_shot["content"] and "reasoning_content" not in message


async def test_history_without_the_think_block_continues_from_the_cache(
    serve: ServeFactory, tokenizer: Tokenizer
) -> None:
    served = await serve(chat_template="g-series", max_new_tokens=MAX_NEW)
    engine = served.app.state.services.model.engine
    first = await glm_chat(served, prompt=QUESTION)
    await idle(engine)
    before = engine.stats()["prompt_tokens"]
    await glm_chat(served, prompt="And when?", history=[[QUESTION, first["content"]]])
    prefilled = engine.stats()["prompt_tokens"] - before
    new_turn = ChatTemplate(name="g-series").segments([ChatMessage("user", "And when?")], think="fake")
    assert prefilled == sum(len(tokenizer.encode(s)) for s in new_turn)
