"""OpenAI tools through the real app and engine (docs/openai.md#tools): calls the grammar forces out of
the tiny noise model, validated against their schemas; streamed calls that add up to the whole reply;
an agent loop whose second request prefills only the new turn; the 400s."""

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

if TYPE_CHECKING:  # the fixtures' types (conftest modules are not importable by name at run time)
    from conftest import Served

CHAT = "/v1/chat/completions"

WEATHER: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 10},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
ADD: dict[str, Any] = {
    "type": "object",
    "properties": {"a": {"type": "integer", "maximum": 999}, "b": {"type": "integer", "maximum": 999}},
    "required": ["a", "b"],
    "additionalProperties": False,
}
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "The weather in a city.", "parameters": WEATHER},
    },
    {"type": "function", "function": {"name": "add", "description": "a + b", "parameters": ADD}},
]
QUESTION = {"role": "user", "content": "What is the weather in Paris?"}


def ask(**fields: Any) -> dict[str, Any]:
    return {"messages": [QUESTION], "tools": TOOLS, "max_tokens": 200, **fields}


def chunks(resp: httpx.Response) -> list[dict[str, Any]]:
    payloads = [line[len("data: ") :] for line in resp.text.splitlines() if line.startswith("data: ")]
    assert payloads[-1] == "[DONE]"
    return [json.loads(p) for p in payloads[:-1]]


def check_calls(calls: list[dict[str, Any]]) -> None:
    for call in calls:
        assert call["type"] == "function"
        assert call["id"].startswith("call_") and len(call["id"]) > 10
        name = call["function"]["name"]
        jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[name])


def assemble(events: list[dict[str, Any]]) -> tuple[str | None, list[dict[str, Any]], str]:
    """A stream's content, calls and finish reason, assembled as the SDKs do (by `index`)."""
    content: str | None = None
    calls: list[dict[str, Any]] = []
    reason = ""
    for event in events:
        if not event["choices"]:
            continue
        choice = event["choices"][0]
        delta = choice["delta"]
        if delta.get("content"):
            content = (content or "") + delta["content"]
        for piece in delta.get("tool_calls", []):
            if piece["index"] == len(calls):
                assert set(piece) == {"index", "id", "type", "function"}
                calls.append({"id": piece["id"], "type": piece["type"], "function": dict(piece["function"])})
            else:
                assert set(piece) == {"index", "function"} and set(piece["function"]) == {"arguments"}
                calls[piece["index"]]["function"]["arguments"] += piece["function"]["arguments"]
        reason = choice["finish_reason"] or reason
    return content, calls, reason


def without_ids(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in c.items() if k != "id"} for c in calls]


@pytest.mark.parametrize("seed", range(3))
async def test_required_gives_calls_that_validate(served: Served, seed: int) -> None:
    body = ask(tool_choice="required", parallel_tool_calls=False, seed=seed)
    resp = await served.client.post(CHAT, json=body)
    assert resp.status_code == 200, resp.text
    choice = resp.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] is None and message["role"] == "assistant"
    assert len(message["tool_calls"]) == 1
    check_calls(message["tool_calls"])


async def test_parallel_calls(served: Served) -> None:
    """The noise model rarely stops calling: every call but one cut by max_tokens validates."""
    choice = (await served.client.post(CHAT, json=ask(tool_choice="required", seed=0))).json()["choices"][0]
    calls = choice["message"]["tool_calls"]
    assert len(calls) > 1
    if choice["finish_reason"] == "length":
        calls = calls[:-1]
    else:
        assert choice["finish_reason"] == "tool_calls"
    check_calls(calls)


async def test_the_named_function(served: Served) -> None:
    for seed in range(3):
        named = {"type": "function", "function": {"name": "add"}}
        body = ask(tool_choice=named, parallel_tool_calls=False, seed=seed)
        out = (await served.client.post(CHAT, json=body)).json()
        assert out["choices"][0]["finish_reason"] == "tool_calls"
        calls = out["choices"][0]["message"]["tool_calls"]
        assert {c["function"]["name"] for c in calls} == {"add"}
        check_calls(calls)


@pytest.mark.parametrize(("seed", "parallel"), [(0, False), (1, False), (2, True)])
async def test_streamed_calls_add_up_to_the_whole_reply(served: Served, seed: int, parallel: bool) -> None:
    body = ask(tool_choice="required", parallel_tool_calls=parallel, seed=seed)
    whole = (await served.client.post(CHAT, json=body)).json()["choices"][0]
    events = chunks(await served.client.post(CHAT, json={**body, "stream": True}))
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": None}
    content, calls, reason = assemble(events)
    assert (content, reason) == (None, whole["finish_reason"])
    assert without_ids(calls) == without_ids(whole["message"]["tool_calls"])
    if not parallel:
        assert reason == "tool_calls"
        check_calls(calls)


async def test_auto_answers_or_calls(served: Served) -> None:
    seen = set()
    for seed in range(6):
        resp = await served.client.post(CHAT, json=ask(seed=seed, max_tokens=60))
        choice = resp.json()["choices"][0]
        message = choice["message"]
        if message.get("tool_calls"):
            seen.add("calls")
            assert choice["finish_reason"] == "tool_calls"
            check_calls(message["tool_calls"])
        else:
            seen.add("text")
            assert "<tool_call>" not in (message["content"] or "")
        events = chunks(
            await served.client.post(CHAT, json={**ask(seed=seed, max_tokens=60), "stream": True})
        )
        content, calls, _ = assemble(events)
        assert content == message["content"]
        assert without_ids(calls) == without_ids(message.get("tool_calls", []))
    assert seen  # which of the two the noise model picks is up to it


async def test_strict_functions_take_no_other_arguments(served: Served) -> None:
    loose = {"type": "object", "properties": {"x": {"type": "boolean"}}, "required": ["x"]}
    tools = [{"type": "function", "function": {"name": "f", "parameters": loose, "strict": True}}]
    for seed in range(3):
        body = ask(tools=tools, tool_choice="required", parallel_tool_calls=False, seed=seed)
        calls = (await served.client.post(CHAT, json=body)).json()["choices"][0]["message"]["tool_calls"]
        assert set(json.loads(calls[0]["function"]["arguments"])) == {"x"}


async def test_max_tokens_inside_a_call_is_length(served: Served) -> None:
    out = (await served.client.post(CHAT, json=ask(tool_choice="required", max_tokens=12, seed=0))).json()
    choice = out["choices"][0]
    assert choice["finish_reason"] == "length"


async def test_none_keeps_the_tools_in_the_prompt_and_writes_no_call(
    served: Served, tokenizer: Tokenizer
) -> None:
    """The prompt is the one "auto" gets (an agent loop keeps its cached prefix), but the grammar
    keeps a model pushed hard towards the pieces of `<tool_call>` from ever writing one."""
    bias = {str(t): 30.0 for t in tokenizer.encode("<tool_call>")}
    body = ask(tool_choice="none", max_tokens=40, seed=0, logit_bias=bias)
    out = (await served.client.post(CHAT, json=body)).json()
    message = out["choices"][0]["message"]
    assert "tool_calls" not in message
    assert "<tool_call>" not in message["content"]
    auto = (await served.client.post(CHAT, json=ask(max_tokens=1))).json()
    assert out["usage"]["prompt_tokens"] == auto["usage"]["prompt_tokens"]


@pytest.mark.parametrize("resend", ["as returned", "re-serialised"])
async def test_an_agent_loop_prefills_only_the_new_turn(
    served: Served, tokenizer: Tokenizer, resend: str
) -> None:
    """Call, tool result, answer: the second request continues from the state after the call."""
    body = ask(tool_choice="required", parallel_tool_calls=False, temperature=0)
    first = await served.client.post(CHAT, json=body)
    message = first.json()["choices"][0]["message"]
    await idle(served.app.state.services.model.engine)
    if resend == "re-serialised":  # what LangChain sends back: json.dumps of the parsed arguments
        for call in message["tool_calls"]:
            args = json.loads(call["function"]["arguments"])
            call["function"]["arguments"] = json.dumps(args, separators=(",", ":"), ensure_ascii=True)
    results = [
        {"role": "tool", "tool_call_id": call["id"], "content": '{"temp_c": 21, "sky": "晴"}'}
        for call in message["tool_calls"]
    ]
    history = [
        QUESTION,
        {"role": "assistant", "content": None, "tool_calls": message["tool_calls"]},
        *results,
    ]
    second = await served.client.post(CHAT, json={**ask(temperature=0, max_tokens=5), "messages": history})
    assert second.status_code == 200, second.text
    usage = second.json()["usage"]
    new_turns = ChatTemplate().segments(
        [ChatMessage("tool", render_tool_result(r["content"])) for r in results]
    )
    prefilled = usage["prompt_tokens"] - usage["prompt_tokens_details"]["cached_tokens"]
    assert prefilled == sum(len(tokenizer.encode(piece)) for piece in new_turns)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "sometimes"}, "tool_choice"),
        ({"tool_choice": {"type": "function"}}, "tool_choice"),
        ({"tools": None, "tool_choice": "required"}, "tool_choice"),
        ({"tools": {"get_weather": {}}}, "tools"),
        ({"tools": [{"type": "retrieval"}]}, "tools"),
        ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "{}"}}]}, "tools"),
        ({"tools": [TOOLS[0], TOOLS[0]]}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "f", "strict": "yes"}}]}, "tools"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"tools": None, "functions": [{"name": "f", "parameters": {}}]}, "functions"),
        ({"function_call": "auto"}, "function_call"),
        ({"messages": [QUESTION, {"role": "assistant", "tool_calls": [{"id": "x"}]}]}, "messages"),
    ],
)
async def test_bad_tools_are_400s(served: Served, fields: dict[str, Any], param: str) -> None:
    resp = await served.client.post(CHAT, json=ask(**fields))
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] is not None and error["param"].startswith(param), error


async def test_a_tool_schema_the_engine_cannot_compile_is_a_400(served: Served) -> None:
    bad = [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "$ref": "#/nowhere"}}}
    ]
    resp = await served.client.post(CHAT, json=ask(tools=bad, tool_choice="required"))
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["type"] == "invalid_request_error"
