"""Structured output and tool calls from the official `openai` SDK and from LangChain (`langchain-openai`)
against a live server (docs/openai.md#structured-output, docs/openai.md#tools). The random-weight model
writes noise: only the grammar can make these replies parse into the clients' models."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Annotated, Any, Literal

import openai
import pytest
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, ConfigDict, Field

from rwkv_gateway.domain.prompts import ChatMessage, ChatTemplate
from rwkv_gateway.domain.tool_calls import render_tool_result
from rwkv_gateway.engine.tokenizer import Tokenizer
from support.live import LiveServer

Short = Annotated[str, Field(max_length=8)]


class Owner(BaseModel):
    model_config = ConfigDict(extra="forbid")

    city: Short
    verified: bool


class Pet(BaseModel):
    """A pet (nested object, enum with a non-ASCII member, bounded integer, array of strings)."""

    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(max_length=12)]
    kind: Literal["cat", "dog", "小鸟"]
    age: Annotated[int, Field(ge=0, le=30)]
    tags: Annotated[list[Short], Field(max_length=3)]
    owner: Owner


class GetWeather(BaseModel):
    """The current weather in a city."""

    city: Annotated[str, Field(max_length=10)]
    unit: Literal["celsius", "fahrenheit"]


class Add(BaseModel):
    """Add two integers."""

    a: Annotated[int, Field(ge=0, le=999)]
    b: Annotated[int, Field(ge=0, le=999)]


MESSAGES: list[Any] = [{"role": "user", "content": "Tell me about a pet."}]


def weather_tool() -> dict[str, Any]:
    return {"type": "function", "function": openai.pydantic_function_tool(GetWeather)["function"]}


@pytest.fixture(scope="module")
def chat(server: LiveServer) -> Iterator[ChatOpenAI]:
    llm = ChatOpenAI(
        model=server.model_name,
        base_url=server.v1,
        api_key=server.api_key,  # type: ignore[arg-type]
        max_retries=0,
        timeout=120,
        max_tokens=300,
        temperature=1.0,
    )
    yield llm


# ---------------------------------------------------------------------------- openai SDK


@pytest.mark.parametrize("seed", range(3))
def test_parse_returns_the_pydantic_model(client: openai.OpenAI, server: LiveServer, seed: int) -> None:
    completion = client.chat.completions.parse(
        model=server.model_name, messages=MESSAGES, response_format=Pet, max_tokens=300, seed=seed
    )
    message = completion.choices[0].message
    assert isinstance(message.parsed, Pet)
    assert completion.choices[0].finish_reason == "stop"


def test_length_first_is_the_sdk_length_error(client: openai.OpenAI, server: LiveServer) -> None:
    with pytest.raises(openai.LengthFinishReasonError):
        client.chat.completions.parse(
            model=server.model_name, messages=MESSAGES, response_format=Pet, max_tokens=4
        )


@pytest.mark.parametrize("parallel", [False, True])
def test_stream_helper_assembles_the_same_calls(
    client: openai.OpenAI, server: LiveServer, parallel: bool
) -> None:
    fields: dict[str, Any] = {
        "model": server.model_name,
        "messages": [{"role": "user", "content": "Weather in Paris?"}],
        "tools": [openai.pydantic_function_tool(GetWeather), openai.pydantic_function_tool(Add)],
        "tool_choice": "required",
        "parallel_tool_calls": parallel,
        "max_tokens": 150,
        "seed": 7,
    }
    if parallel:
        # The noise model keeps calling until max_tokens (and the helper parses no strict tool then).
        fields["tools"] = [
            {"type": "function", "function": {**t["function"], "strict": False}} for t in fields["tools"]
        ]
    whole = client.chat.completions.create(**fields).choices[0]
    with client.chat.completions.stream(**fields) as stream:
        if parallel:  # cut by max_tokens: get_final_completion() would refuse to parse it
            for _ in stream:
                pass
            streamed: Any = stream.current_completion_snapshot.choices[0]
        else:
            streamed = stream.get_final_completion().choices[0]
    assert streamed.finish_reason == whole.finish_reason
    assert streamed.message.content is None and whole.message.content is None
    whole_calls = whole.message.tool_calls or []
    streamed_calls = streamed.message.tool_calls or []
    assert [(c.function.name, c.function.arguments) for c in streamed_calls] == [  # type: ignore[union-attr]
        (c.function.name, c.function.arguments)  # type: ignore[union-attr]
        for c in whole_calls
    ]
    assert all(c.id.startswith("call_") for c in streamed_calls)
    if not parallel:
        assert whole.finish_reason == "tool_calls" and len(whole_calls) == 1
        call = whole_calls[0]
        model = {"GetWeather": GetWeather, "Add": Add}[call.function.name]  # type: ignore[union-attr]
        model.model_validate_json(call.function.arguments)  # type: ignore[union-attr]
        # The stream helper parses `strict` tools' arguments into the model.
        parsed = streamed_calls[0].function.parsed_arguments  # type: ignore[union-attr]
        assert isinstance(parsed, model)


def test_bad_fields_are_bad_request_errors(client: openai.OpenAI, server: LiveServer) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
        ({"response_format": {"type": "yaml"}}, "response_format"),
        (
            {"tools": [weather_tool()], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools"),
    ]
    for fields, param in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model=server.model_name, messages=MESSAGES, max_tokens=5, **fields)
        assert caught.value.param == param


# ---------------------------------------------------------------------------- LangChain


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_with_structured_output_returns_the_model(chat: ChatOpenAI, method: str) -> None:
    """json_schema: response_format; function_calling: a named tool (LangChain's two strict methods)."""
    structured = chat.with_structured_output(Pet, method=method)  # type: ignore[arg-type]
    for seed in range(2):
        pet = structured.invoke("Tell me about a pet.", seed=seed)
        assert isinstance(pet, Pet), pet


def test_bind_tools_required_returns_calls_that_validate(chat: ChatOpenAI) -> None:
    llm = chat.bind_tools([GetWeather, Add], tool_choice="required", parallel_tool_calls=False, strict=True)
    for seed in range(3):
        message = llm.invoke("What is the weather in Paris?", seed=seed)
        assert isinstance(message, AIMessage)
        assert message.response_metadata["finish_reason"] == "tool_calls"
        assert len(message.tool_calls) == 1 and not message.invalid_tool_calls
        call = message.tool_calls[0]
        {"GetWeather": GetWeather, "Add": Add}[call["name"]].model_validate(call["args"])


def test_a_two_step_agent_loop(chat: ChatOpenAI, server: LiveServer, tokenizer: Tokenizer) -> None:
    """Call, tool result, answer: LangChain sends the call back re-serialised, and the second request
    still prefills only the tool-result turn (the state after the call was cached in history form)."""
    tools: list[Any] = [GetWeather, Add]
    question = HumanMessage("What is the weather in Paris?")
    call_message = chat.bind_tools(
        tools, tool_choice="required", parallel_tool_calls=False, strict=True
    ).invoke([question], temperature=0)
    assert isinstance(call_message, AIMessage) and len(call_message.tool_calls) == 1
    call = call_message.tool_calls[0]
    result = ToolMessage(json.dumps({"temp_c": 21, "sky": "晴"}, ensure_ascii=False), tool_call_id=call["id"])
    server.wait_for(lambda s: s["active_sequences"] == 0 and s["queue_depth"] == 0, what="an idle engine")
    answer = chat.bind_tools(tools, tool_choice="none", strict=True).invoke(
        [question, call_message, result], temperature=0, max_tokens=8
    )
    assert isinstance(answer, AIMessage) and not answer.tool_calls
    assert isinstance(answer.content, str) and "<tool_call>" not in answer.content
    usage = answer.usage_metadata
    assert usage is not None
    cached = usage.get("input_token_details", {}).get("cache_read", 0)
    new_turn = ChatTemplate().segments([ChatMessage("tool", render_tool_result(str(result.content)))])
    assert usage["input_tokens"] - cached == sum(len(tokenizer.encode(p)) for p in new_turn)
