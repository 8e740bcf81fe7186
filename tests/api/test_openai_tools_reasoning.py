"""Structured output and tool calls on a G-series template (docs/openai.md#tools, docs/openai.md#reasoning):
the think block comes first and free (`reasoning_content`), then the constrained answer (`content` or
`tool_calls`), streamed or not; with fake think the answer comes at once. The noise model would never
close a think block by itself: a logit bias on the pieces of `</think>`, and a frequency penalty that
makes it take turns between them, make it do so soon."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import httpx
import jsonschema
import pytest

from rwkv_gateway.domain.prompts import ChatMessage, ChatTemplate
from rwkv_gateway.domain.tool_calls import render_tool_result
from rwkv_gateway.engine.tokenizer import Tokenizer
from support import idle

if TYPE_CHECKING:
    from conftest import Served, ServeFactory

CHAT = "/v1/chat/completions"
ADD: dict[str, Any] = {
    "type": "object",
    "properties": {"a": {"type": "integer", "maximum": 99}, "b": {"type": "integer", "maximum": 99}},
    "required": ["a", "b"],
    "additionalProperties": False,
}
TOOLS = [{"type": "function", "function": {"name": "add", "parameters": ADD}}]


def chunks(resp: httpx.Response) -> list[dict[str, Any]]:
    payloads = [line[len("data: ") :] for line in resp.text.splitlines() if line.startswith("data: ")]
    assert payloads[-1] == "[DONE]"
    return [json.loads(p) for p in payloads[:-1]]


def close_think(tokenizer: Tokenizer) -> dict[str, float]:
    return {str(t): 40.0 for t in tokenizer.encode("</think>")}


@pytest.fixture
async def g_series(serve: ServeFactory) -> Served:
    return await serve(chat_template="g-series")


@pytest.mark.parametrize("effort", ["minimal", "low", "high"])
async def test_reasoning_then_a_call(g_series: Served, tokenizer: Tokenizer, effort: str) -> None:
    body = {
        "messages": [{"role": "user", "content": "2 + 3?"}],
        "tools": TOOLS,
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "reasoning_effort": effort,
        "max_tokens": 300,
        "seed": 1,
        "logit_bias": close_think(tokenizer),
        "frequency_penalty": 2.0,
    }
    choice = (await g_series.client.post(CHAT, json=body)).json()["choices"][0]
    message = choice["message"]
    assert choice["finish_reason"] == "tool_calls", message
    assert message["content"] is None
    (call,) = message["tool_calls"]
    jsonschema.validate(json.loads(call["function"]["arguments"]), ADD)
    assert ("reasoning_content" in message) == (effort != "minimal")
    deltas = [
        c["choices"][0]["delta"]
        for c in chunks(await g_series.client.post(CHAT, json={**body, "stream": True}))
        if c["choices"]
    ]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == message.get("reasoning_content", "")
    arguments = "".join(t["function"]["arguments"] for d in deltas for t in d.get("tool_calls", []))
    assert arguments == call["function"]["arguments"]


@pytest.mark.parametrize("effort", ["minimal", "medium"])
async def test_reasoning_then_json(g_series: Served, tokenizer: Tokenizer, effort: str) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "sum", "schema": ADD, "strict": True}}
    body = {
        "messages": [{"role": "user", "content": "2 + 3?"}],
        "response_format": fmt,
        "reasoning_effort": effort,
        "max_tokens": 300,
        "seed": 2,
        "logit_bias": close_think(tokenizer),
        "frequency_penalty": 2.0,
    }
    choice = (await g_series.client.post(CHAT, json=body)).json()["choices"][0]
    assert choice["finish_reason"] == "stop", choice
    jsonschema.validate(json.loads(choice["message"]["content"]), ADD)


async def test_an_agent_loop_after_thinking_prefills_only_the_tool_result(
    g_series: Served, tokenizer: Tokenizer
) -> None:
    """The client resends the call without the think block; the state kept after the reply is that
    history (docs/chat-prompts.md#7-resent-history-after-thinking), so only the result is prefilled."""
    question = {"role": "user", "content": "2 + 3?"}
    body = {
        "messages": [question],
        "tools": TOOLS,
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "reasoning_effort": "medium",
        "max_tokens": 300,
        "seed": 1,
        "logit_bias": close_think(tokenizer),
        "frequency_penalty": 2.0,
    }
    message = (await g_series.client.post(CHAT, json=body)).json()["choices"][0]["message"]
    assert message["reasoning_content"] and message["tool_calls"]
    await idle(g_series.app.state.services.model.engine)
    (call,) = message["tool_calls"]
    result = {"role": "tool", "tool_call_id": call["id"], "content": "5"}
    history = [question, {"role": "assistant", "content": None, "tool_calls": [call]}, result]
    second = await g_series.client.post(CHAT, json={**body, "messages": history, "max_tokens": 2})
    usage = second.json()["usage"]
    new_turn = ChatTemplate(name="g-series").segments(
        [ChatMessage("tool", render_tool_result("5"))], think="think"
    )
    prefilled = usage["prompt_tokens"] - usage["prompt_tokens_details"]["cached_tokens"]
    assert prefilled == sum(len(tokenizer.encode(piece)) for piece in new_turn)
