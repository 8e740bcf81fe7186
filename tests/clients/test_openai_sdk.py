"""The official `openai` SDK (sync and async) against a live `rwkv_gateway serve` process.

The model is a tiny random-weight RWKV-7, so replies are noise made of real tokens; greedy decoding
(temperature 0) is deterministic, and so is sampling with a seed. The tests check the wire contract of
docs/openai.md as the SDK sees it: shapes, stream invariants, usage, stops, seeds, n, errors.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import struct
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import openai
import pytest

from rwkv_gateway.domain.prompts import ChatMessage, ChatTemplate
from rwkv_gateway.domain.types import FinishReason, GenerationRequest, SamplingParams
from rwkv_gateway.engine.backend_rwkv import RwkvPackageBackend
from rwkv_gateway.engine.scheduler import EngineConfig, Scheduler
from rwkv_gateway.engine.tokenizer import Tokenizer

if TYPE_CHECKING:
    from support.live import LiveServer

USER_TEXT = "Tell me a long story about a lighthouse keeper and the sea."
MESSAGES: list[Any] = [{"role": "user", "content": USER_TEXT}]
GREEDY: dict[str, Any] = {"temperature": 0}


def chat(client: openai.OpenAI, server: LiveServer, **kwargs: Any) -> Any:
    return client.chat.completions.create(
        model=server.model_name, messages=kwargs.pop("messages", MESSAGES), **kwargs
    )


def collect_chat_stream(chunks: list[Any]) -> tuple[dict[int, str], dict[int, str], Any]:
    """(text per choice index, finish_reason per index, usage) of a chat stream, checking the
    invariants of docs/openai.md#3-chat-completion-streams on the way: constant id/created/model,
    `role` first, one finish_reason per choice."""
    assert chunks, "empty stream"
    texts: dict[int, str] = defaultdict(str)
    finishes: dict[int, str] = {}
    seen_role: set[int] = set()
    usage = None
    first = chunks[0]
    for chunk in chunks:
        assert chunk.object == "chat.completion.chunk"
        assert (chunk.id, chunk.created, chunk.model) == (first.id, first.created, first.model)
        assert isinstance(chunk.created, int)
        if chunk.usage is not None:
            assert chunk.choices == [], "usage travels in its own chunk with no choices"
            assert usage is None, "usage sent twice"
            usage = chunk.usage
            continue
        assert usage is None, "a chunk after the usage chunk"
        for choice in chunk.choices:
            i = choice.index
            if i not in seen_role:
                assert choice.delta.role == "assistant", f"choice {i}: first chunk lacks role"
                seen_role.add(i)
            assert i not in finishes, f"choice {i}: a chunk after its finish_reason"
            if choice.delta.content:
                texts[i] += choice.delta.content
            if choice.finish_reason is not None:
                finishes[i] = choice.finish_reason
    assert seen_role == set(finishes), "every choice needs exactly one finish_reason"
    return dict(texts), finishes, usage


def tokenize(server: LiveServer, text: str) -> list[int]:
    """Token ids through the vLLM-style /tokenize utility route (at the root, not under /v1)."""
    resp = httpx.post(f"{server.url}/tokenize", json={"model": server.model_name, "prompt": text}, timeout=30)
    assert resp.status_code == 200, resp.text
    tokens: list[int] = resp.json()["tokens"]
    return tokens


# ---------------------------------------------------------------------------- models


def test_models_list_and_retrieve(client: openai.OpenAI, server: LiveServer) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [server.model_name]
    card = models.data[0]
    assert card.object == "model" and card.owned_by == "rwkv" and isinstance(card.created, int)
    one = client.models.retrieve(server.model_name)
    assert one.id == server.model_name and one.object == "model"


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("gpt-4o")
    assert info.value.status_code == 404
    assert isinstance(info.value.body, dict) and info.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError) as chat_info:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=4)
    assert isinstance(chat_info.value.body, dict) and chat_info.value.body["param"] == "model"


# ---------------------------------------------------------------------------- chat completions


def test_chat_non_stream_has_the_full_shape(client: openai.OpenAI, server: LiveServer) -> None:
    reply = chat(client, server, max_tokens=24, **GREEDY)
    assert reply.id.startswith("chatcmpl-") and reply.object == "chat.completion"
    assert isinstance(reply.created, int) and reply.model == server.model_name
    assert reply.system_fingerprint
    assert len(reply.choices) == 1
    choice = reply.choices[0]
    assert choice.index == 0 and choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.message.content == choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    usage = reply.usage
    assert usage is not None and usage.prompt_tokens > 0 and 0 < usage.completion_tokens <= 24
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_chat_stream_with_usage_equals_non_stream(client: openai.OpenAI, server: LiveServer) -> None:
    whole = chat(client, server, max_tokens=32, **GREEDY)
    with chat(
        client, server, max_tokens=32, stream=True, stream_options={"include_usage": True}, **GREEDY
    ) as stream:
        chunks = list(stream)
    texts, finishes, usage = collect_chat_stream(chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage is not None, "usage must come last"
    assert all(c.usage is None for c in chunks[:-1])
    assert texts[0] == whole.choices[0].message.content
    assert finishes == {0: whole.choices[0].finish_reason}
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert (usage.prompt_tokens, usage.completion_tokens) == (
        whole.usage.prompt_tokens,
        whole.usage.completion_tokens,
    )


def test_chat_stream_without_usage_option_sends_no_usage(client: openai.OpenAI, server: LiveServer) -> None:
    with chat(client, server, max_tokens=8, stream=True, **GREEDY) as stream:
        chunks = list(stream)
    _, finishes, usage = collect_chat_stream(chunks)
    assert usage is None and finishes == {0: "length"}


def test_chat_stream_helper_accumulates(client: openai.OpenAI, server: LiveServer) -> None:
    """`chat.completions.stream()` needs role and finish_reason in the chunks to build its result; like
    `parse()`, it refuses a reply cut by the length limit."""
    whole = chat(client, server, max_tokens=16, **GREEDY)
    text = whole.choices[0].message.content
    assert whole.choices[0].finish_reason == "length"
    with (
        pytest.raises(openai.LengthFinishReasonError) as info,
        client.chat.completions.stream(
            model=server.model_name, messages=MESSAGES, max_tokens=16, temperature=0
        ) as stream,
    ):
        stream.get_final_completion()
    assert info.value.completion.choices[0].message.content == text
    stop = text[len(text) // 2 :][:3]
    with client.chat.completions.stream(
        model=server.model_name, messages=MESSAGES, max_tokens=16, temperature=0, stop=stop
    ) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].finish_reason == "stop"
    assert final.choices[0].message.content == text[: text.find(stop)].strip()
    assert final.choices[0].message.role == "assistant"


async def test_async_client_stream_equals_non_stream(server: LiveServer) -> None:
    async with server.async_openai() as aclient:
        whole = await aclient.chat.completions.create(
            model=server.model_name, messages=MESSAGES, max_tokens=24, temperature=0
        )
        stream = await aclient.chat.completions.create(
            model=server.model_name,
            messages=MESSAGES,
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        async with stream:
            chunks = [chunk async for chunk in stream]
    texts, finishes, usage = collect_chat_stream(chunks)
    assert texts[0] == whole.choices[0].message.content
    assert finishes[0] == whole.choices[0].finish_reason
    assert usage.completion_tokens == whole.usage.completion_tokens


async def test_concurrent_greedy_requests_match_a_lone_one(server: LiveServer) -> None:
    """Requests batched together by the engine give the text each gives alone."""
    async with server.async_openai() as aclient:

        async def one() -> str:
            reply = await aclient.chat.completions.create(
                model=server.model_name, messages=MESSAGES, max_tokens=20, temperature=0
            )
            return str(reply.choices[0].message.content)

        alone = await one()
        together = await asyncio.gather(*(one() for _ in range(4)))
    assert together == [alone] * 4


def test_n_choices_come_from_the_same_prompt_state(client: openai.OpenAI, server: LiveServer) -> None:
    single = chat(client, server, max_tokens=12, temperature=1, seed=11)
    reply = chat(client, server, max_tokens=12, temperature=1, seed=11, n=2)
    assert [c.index for c in reply.choices] == [0, 1]
    # The prompt is prefilled once, and choice i samples from a copy of that state with seed + i.
    assert reply.usage.prompt_tokens == single.usage.prompt_tokens
    assert reply.choices[0].message.content == single.choices[0].message.content
    next_seed = chat(client, server, max_tokens=12, temperature=1, seed=12)
    assert reply.usage.completion_tokens == single.usage.completion_tokens + next_seed.usage.completion_tokens
    assert reply.choices[1].message.content == next_seed.choices[0].message.content
    assert reply.choices[0].message.content != reply.choices[1].message.content
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    # Greedy: every choice is the greedy reply.
    greedy_single = chat(client, server, max_tokens=12, **GREEDY)
    greedy = chat(client, server, max_tokens=12, n=2, **GREEDY)
    expected = greedy_single.choices[0].message.content
    assert [c.message.content for c in greedy.choices] == [expected, expected]


def test_n_choices_stream_by_index(client: openai.OpenAI, server: LiveServer) -> None:
    whole = chat(client, server, max_tokens=12, temperature=1, seed=3, n=2)
    with chat(
        client,
        server,
        max_tokens=12,
        temperature=1,
        seed=3,
        n=2,
        stream=True,
        stream_options={"include_usage": True},
    ) as stream:
        texts, finishes, usage = collect_chat_stream(list(stream))
    assert texts == {c.index: c.message.content for c in whole.choices}
    assert finishes == {c.index: c.finish_reason for c in whole.choices}
    assert usage.completion_tokens == whole.usage.completion_tokens
    assert usage.prompt_tokens == whole.usage.prompt_tokens


def test_stop_string_cuts_the_reply(client: openai.OpenAI, server: LiveServer) -> None:
    full = chat(client, server, max_tokens=40, **GREEDY)
    text = full.choices[0].message.content
    assert full.choices[0].finish_reason == "length" and len(text) > 20
    # A stop string taken from the middle of the greedy reply: the reply must end before it.
    middle = len(text) // 2
    stop = text[middle : middle + 3]
    cut_at = text.find(stop)
    assert cut_at > 0
    expected = text[:cut_at].strip()
    reply = chat(client, server, max_tokens=40, stop=[stop, "never-appears-xyz"], **GREEDY)
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens < 40
    with chat(client, server, max_tokens=40, stop=stop, stream=True, **GREEDY) as stream:
        texts, finishes, _ = collect_chat_stream(list(stream))
    assert texts.get(0, "") == expected and finishes == {0: "stop"}


def test_seed_reproducibility(client: openai.OpenAI, server: LiveServer) -> None:
    def sample(seed: int) -> str:
        reply = chat(client, server, max_tokens=16, temperature=1, seed=seed)
        return str(reply.choices[0].message.content)

    first = sample(1234)
    assert sample(1234) == first
    assert sample(4321) != first


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_truncates_with_length(client: openai.OpenAI, server: LiveServer, field: str) -> None:
    reply = chat(client, server, **{field: 7}, **GREEDY)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 7
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 7


def test_seeded_stream_equals_non_stream(client: openai.OpenAI, server: LiveServer) -> None:
    whole = chat(client, server, max_tokens=20, temperature=1, top_p=0.9, seed=99)
    with chat(client, server, max_tokens=20, temperature=1, top_p=0.9, seed=99, stream=True) as stream:
        texts, finishes, _ = collect_chat_stream(list(stream))
    assert texts.get(0, "") == whole.choices[0].message.content
    assert finishes == {0: whole.choices[0].finish_reason}


def test_content_parts_and_roles(client: openai.OpenAI, server: LiveServer) -> None:
    as_string = chat(client, server, max_tokens=10, **GREEDY)
    parts = [{"type": "text", "text": USER_TEXT[:20]}, {"type": "text", "text": USER_TEXT[20:]}]
    as_parts = chat(client, server, messages=[{"role": "user", "content": parts}], max_tokens=10, **GREEDY)
    assert as_parts.choices[0].message.content == as_string.choices[0].message.content
    assert as_parts.usage.prompt_tokens == as_string.usage.prompt_tokens
    # developer is read as system: the same prompt, so the same greedy reply.
    conversation: list[Any] = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": USER_TEXT},
    ]
    with_system = chat(client, server, messages=conversation, max_tokens=10, **GREEDY)
    with_developer = chat(
        client,
        server,
        messages=[{**conversation[0], "role": "developer"}, *conversation[1:]],
        max_tokens=10,
        **GREEDY,
    )
    assert with_developer.choices[0].message.content == with_system.choices[0].message.content
    assert with_system.usage.prompt_tokens > as_string.usage.prompt_tokens
    with pytest.raises(openai.BadRequestError) as info:
        chat(
            client,
            server,
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            max_tokens=4,
        )
    assert isinstance(info.value.body, dict) and info.value.body["param"] == "messages"


def test_optional_fields_and_extensions_are_accepted(client: openai.OpenAI, server: LiveServer) -> None:
    greedy = chat(client, server, max_tokens=8, **GREEDY)
    reply = chat(
        client,
        server,
        max_tokens=8,
        temperature=0,
        user="someone",
        metadata={"suite": "clients"},
        store=False,
        service_tier="auto",
        parallel_tool_calls=False,
        logprobs=True,
        top_logprobs=2,
        response_format={"type": "text"},
        presence_penalty=0,
        frequency_penalty=0,
    )
    assert reply.choices[0].message.content == greedy.choices[0].message.content
    assert reply.choices[0].logprobs is None  # unsupported logprobs are reported as null
    sampled = chat(
        client,
        server,
        max_tokens=8,
        temperature=0.8,
        seed=5,
        response_format={"type": "json_object"},
        extra_body={
            "top_k": 20,
            "min_p": 0.05,
            "repetition_penalty": 1.1,
            "penalty_decay": 0.99,
            "mirostat_mode": 2,
            "mirostat_tau": 5.0,
            "mirostat_eta": 0.1,
        },
    )
    assert sampled.choices[0].finish_reason in ("stop", "length")
    # Tools are served (tests/clients/test_openai_sdk_tools.py); a malformed one is a 400.
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, server, max_tokens=4, tools=[{"type": "function", "function": {"name": "f g"}}])
    assert isinstance(info.value.body, dict) and info.value.body["param"] == "tools"


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_above_the_server_limit_is_400(
    client: openai.OpenAI, server: LiveServer, field: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, server, **{field: 2_000_000})  # the server allows at most 1 000 000
    assert isinstance(info.value.body, dict) and info.value.body["param"] == field


def test_prompt_too_long_is_400_context_length_exceeded(busy_server: LiveServer) -> None:
    long_text = "lighthouse keeper " * 400  # well over the server's 256-token limit
    with busy_server.openai() as sdk, pytest.raises(openai.BadRequestError) as info:
        sdk.chat.completions.create(
            model=busy_server.model_name, messages=[{"role": "user", "content": long_text}], max_tokens=4
        )
    assert isinstance(info.value.body, dict) and info.value.body["code"] == "context_length_exceeded"


def test_invalid_json_is_a_400_envelope_not_422(server: LiveServer) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as http:
        bad = http.post(
            "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
        )
        missing = http.post("/v1/chat/completions", json={"max_tokens": 3})
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    assert missing.status_code == 400
    assert missing.json()["error"]["param"] == "messages"
    assert missing.json()["error"]["code"] == "missing_required_parameter"


# ---------------------------------------------------------------------------- legacy completions


def test_completions_string_prompt(client: openai.OpenAI, server: LiveServer) -> None:
    prompt = "The history of the lighthouse"
    whole = client.completions.create(model=server.model_name, prompt=prompt, max_tokens=10, temperature=0)
    assert whole.object == "text_completion" and whole.id.startswith("cmpl-")
    assert len(whole.choices) == 1 and whole.choices[0].index == 0
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 10
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 10
    with client.completions.create(
        model=server.model_name,
        prompt=prompt,
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    ) as stream:
        chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        "length"
    ]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 10


def test_completions_default_max_tokens_is_16(client: openai.OpenAI, server: LiveServer) -> None:
    whole = client.completions.create(model=server.model_name, prompt="Once upon a time", temperature=0)
    assert whole.usage.completion_tokens <= 16
    if whole.choices[0].finish_reason == "length":
        assert whole.usage.completion_tokens == 16


def test_completions_list_of_prompts_with_echo(client: openai.OpenAI, server: LiveServer) -> None:
    prompts = ["The sea was", "Q: what is a lighthouse?\nA:"]
    singles = [
        client.completions.create(model=server.model_name, prompt=p, max_tokens=6, temperature=0)
        for p in prompts
    ]
    whole = client.completions.create(
        model=server.model_name, prompt=prompts, max_tokens=6, temperature=0, echo=True
    )
    assert [c.index for c in whole.choices] == [0, 1]
    for choice, prompt, single in zip(whole.choices, prompts, singles, strict=True):
        assert choice.text == prompt + single.choices[0].text
    assert whole.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles)
    assert whole.usage.completion_tokens == sum(s.usage.completion_tokens for s in singles)
    with client.completions.create(
        model=server.model_name, prompt=prompts, max_tokens=6, temperature=0, echo=True, stream=True
    ) as stream:
        chunks = list(stream)
    texts: dict[int, str] = defaultdict(str)
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert dict(texts) == {c.index: c.text for c in whole.choices}


def test_completions_token_id_prompts_and_stop(client: openai.OpenAI, server: LiveServer) -> None:
    text_prompt = "The sea was calm"
    by_text = client.completions.create(
        model=server.model_name, prompt=text_prompt, max_tokens=24, temperature=0
    )
    ids = tokenize(server, text_prompt)
    by_ids = client.completions.create(model=server.model_name, prompt=ids, max_tokens=24, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    both = client.completions.create(model=server.model_name, prompt=[ids, ids], max_tokens=24, temperature=0)
    assert [c.text for c in both.choices] == [by_text.choices[0].text] * 2
    # A stop string from the middle of the reply cuts it there (no chat template: the raw text).
    text = by_text.choices[0].text
    stop = text[len(text) // 2 :][:3]
    cut = client.completions.create(
        model=server.model_name, prompt=text_prompt, max_tokens=24, temperature=0, stop=stop
    )
    assert cut.choices[0].text == text[: text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"


# ---------------------------------------------------------------------------- embeddings


def test_embeddings_base64_and_float_agree(client: openai.OpenAI, server: LiveServer) -> None:
    inputs = ["the lighthouse keeper", "a stormy sea"]
    # The SDK asks for base64 unless told otherwise and decodes the little-endian float32 itself.
    default = client.embeddings.create(model=server.model_name, input=inputs)
    floats = client.embeddings.create(model=server.model_name, input=inputs, encoding_format="float")
    assert [d.index for d in default.data] == [0, 1] == [d.index for d in floats.data]
    assert default.usage.prompt_tokens > 0 and default.usage.total_tokens == default.usage.prompt_tokens
    for a, b in zip(default.data, floats.data, strict=True):
        assert len(a.embedding) == len(b.embedding) > 0
        assert max(abs(x - y) for x, y in zip(a.embedding, b.embedding, strict=True)) < 1e-6
        assert math.isclose(math.fsum(x * x for x in b.embedding), 1.0, abs_tol=1e-5)
    assert default.data[0].embedding != default.data[1].embedding


def test_embeddings_dimensions_truncate_and_renormalise(client: openai.OpenAI, server: LiveServer) -> None:
    full = client.embeddings.create(model=server.model_name, input="hello", encoding_format="float")
    vector = full.data[0].embedding
    norm = math.sqrt(math.fsum(x * x for x in vector[:16]))
    expected = [x / norm for x in vector[:16]]
    as_floats = client.embeddings.create(
        model=server.model_name, input="hello", dimensions=16, encoding_format="float"
    )
    # The SDK decodes base64 only when it chose the encoding itself; asked for explicitly, the string
    # comes back as sent: little-endian float32.
    as_base64 = client.embeddings.create(
        model=server.model_name, input="hello", dimensions=16, encoding_format="base64"
    )
    raw = as_base64.data[0].embedding
    assert isinstance(raw, str)
    decoded = list(struct.unpack("<16f", base64.b64decode(raw)))
    by_default = client.embeddings.create(model=server.model_name, input="hello", dimensions=16)
    for got in (as_floats.data[0].embedding, decoded, by_default.data[0].embedding):
        assert len(got) == 16
        assert max(abs(g - e) for g, e in zip(got, expected, strict=True)) < 1e-6
        assert math.isclose(math.fsum(x * x for x in got), 1.0, abs_tol=1e-5)
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model=server.model_name, input="hello", dimensions=len(vector) + 1)
    assert isinstance(info.value.body, dict) and info.value.body["param"] == "dimensions"


def test_embeddings_of_token_ids_match_text(client: openai.OpenAI, server: LiveServer) -> None:
    text = "the lighthouse keeper"
    ids = tokenize(server, text)
    by_text = client.embeddings.create(model=server.model_name, input=text, encoding_format="float")
    by_ids = client.embeddings.create(model=server.model_name, input=[ids, ids], encoding_format="float")
    assert len(by_ids.data) == 2
    for item in by_ids.data:
        assert max(abs(a - b) for a, b in zip(item.embedding, by_text.data[0].embedding, strict=True)) < 1e-6
    assert by_ids.usage.prompt_tokens == 2 * by_text.usage.prompt_tokens == 2 * len(ids)


def test_a_large_embeddings_batch_is_served_by_an_idle_server(
    client: openai.OpenAI, server: LiveServer
) -> None:
    """The route accepts up to 2048 inputs, so an idle server must embed 300 of them.

    KNOWN BUG (fails until fixed): `Scheduler.embed` submits every input to the engine queue before
    collecting any, so a request with more inputs than queue_size + max_batch_size (256 + 32 by
    default) is answered 503 `overloaded` (with `x-should-retry: true`, so SDKs retry it in vain) even
    when nothing else is running.
    """
    server.wait_for(lambda s: s["active_sequences"] == 0 and s["queue_depth"] == 0, what="an idle engine")
    inputs = [f"text number {i}" for i in range(300)]
    try:
        reply = client.embeddings.create(model=server.model_name, input=inputs, encoding_format="float")
    except openai.InternalServerError as exc:
        raise AssertionError(
            f"an idle server refused 300 embedding inputs with {exc.status_code} {exc.body}: "
            "/v1/embeddings floods the engine queue with one request per input"
        ) from None
    assert [d.index for d in reply.data] == list(range(300))


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"temperature": 5}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"n": 0}, "n"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": []}, "messages"),
    ],
)
def test_bad_parameter_is_400_naming_it(
    client: openai.OpenAI, server: LiveServer, kwargs: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, server, max_tokens=4, **kwargs)
    assert info.value.status_code == 400
    body = info.value.body
    assert isinstance(body, dict)
    assert body["param"] == param and body["type"] == "invalid_request_error"
    assert isinstance(body["message"], str) and body["message"]
    # A stream is refused the same way, before any event is sent.
    with pytest.raises(openai.BadRequestError) as stream_info:
        chat(client, server, max_tokens=4, stream=True, **kwargs)
    assert isinstance(stream_info.value.body, dict) and stream_info.value.body["param"] == param


def test_full_queue_is_503(busy_server: LiveServer) -> None:
    """One slot busy with a long stream, one request waiting: the next is a 503 the SDK does not retry."""
    body = {
        "model": busy_server.model_name,
        "messages": MESSAGES,
        "max_tokens": 500_000,
        "temperature": 0,
        "stream": True,
    }
    with httpx.Client(base_url=busy_server.url, timeout=60) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as running:
            assert running.status_code == 200
            busy_server.wait_for(lambda s: s["active_sequences"] == 1, what="the first stream to run")
            with http.stream("POST", "/v1/chat/completions", json=body) as waiting:
                assert waiting.status_code == 200
                busy_server.wait_for(
                    lambda s: s["queue_depth"] == 1 and s["active_sequences"] == 1,
                    what="one running and one queued",
                )
                with busy_server.openai() as sdk, pytest.raises(openai.InternalServerError) as info:
                    sdk.chat.completions.create(model=busy_server.model_name, messages=MESSAGES, max_tokens=4)
        err = info.value
        assert err.status_code == 503
        assert isinstance(err.body, dict) and err.body["code"] == "overloaded"
        assert int(err.response.headers["retry-after"]) >= 1
    # Both streams were closed by the client: their sequences are cancelled, the slot frees up.
    busy_server.wait_for(
        lambda s: s["queue_depth"] == 0 and s["active_sequences"] == 0, what="the engine to drain"
    )
    with busy_server.openai() as sdk:
        reply = sdk.chat.completions.create(model=busy_server.model_name, messages=MESSAGES, max_tokens=4)
    assert reply.choices[0].finish_reason in ("stop", "length")


# ---------------------------------------------------------------------------- HTTP vs engine, disconnects


async def test_greedy_chat_matches_the_engine_called_directly(
    client: openai.OpenAI, server: LiveServer, v7_backend: RwkvPackageBackend, tokenizer: Tokenizer
) -> None:
    reply = await asyncio.to_thread(chat, client, server, max_tokens=40, **GREEDY)
    template = ChatTemplate()
    prompt = template.render([ChatMessage("user", USER_TEXT)])
    engine = Scheduler(v7_backend, tokenizer, EngineConfig())
    await engine.start()
    try:
        stream = await engine.submit(
            GenerationRequest(
                prompt=prompt,
                sampling=SamplingParams(temperature=0),
                max_tokens=40,
                stop=template.stops,
            )
        )
        text, finish = await stream.collect()
    finally:
        await engine.aclose()
    assert reply.choices[0].message.content == text.strip()
    assert reply.usage.prompt_tokens == finish.usage.prompt_tokens
    assert reply.usage.completion_tokens == finish.usage.completion_tokens
    expected_reason = "stop" if finish.reason is FinishReason.STOP else "length"
    assert reply.choices[0].finish_reason == expected_reason


def test_client_disconnect_cancels_the_sequence(server: LiveServer) -> None:
    server.wait_for(lambda s: s["active_sequences"] == 0, what="an idle engine")
    body = {
        "model": server.model_name,
        "messages": MESSAGES,
        "max_tokens": 500_000,  # would run for many minutes if the disconnect went unnoticed
        "temperature": 0,
        "stream": True,
    }
    with (
        httpx.Client(base_url=server.url, timeout=60) as http,
        http.stream("POST", "/v1/chat/completions", json=body) as resp,
    ):
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = []
        lines = resp.iter_lines()
        for line in lines:
            if line.startswith("data: "):
                events.append(json.loads(line.removeprefix("data: ")))
            if len(events) >= 5:
                break
        assert all(e["object"] == "chat.completion.chunk" for e in events)
        assert server.readyz()["active_sequences"] == 1, "the stream should still be generating"
        lines.close()  # closing the body iterator drops the connection mid-stream
    server.wait_for(lambda s: s["active_sequences"] == 0, timeout=30, what="the cancelled sequence to go")


def test_server_log_has_no_tracebacks(server: LiveServer) -> None:
    log = Path(server.log).read_text(errors="replace")
    assert "Traceback" not in log, log[-4000:]


# ---------------------------------------------------------------------------- API keys


def test_a_wrong_or_missing_key_is_401(keyed_server: LiveServer) -> None:
    with keyed_server.openai(api_key="sk-wrong") as wrong:
        with pytest.raises(openai.AuthenticationError) as info:
            wrong.chat.completions.create(model=keyed_server.model_name, messages=MESSAGES, max_tokens=4)
        assert info.value.status_code == 401
        assert isinstance(info.value.body, dict) and info.value.body["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        with pytest.raises(openai.AuthenticationError):
            wrong.embeddings.create(model=keyed_server.model_name, input="hi")
        with pytest.raises(openai.AuthenticationError):
            wrong.completions.create(model=keyed_server.model_name, prompt="hi", max_tokens=2)
    with httpx.Client(base_url=keyed_server.v1, timeout=30) as http:
        missing = http.post(
            "/chat/completions",
            json={"model": keyed_server.model_name, "messages": MESSAGES, "max_tokens": 2},
        )
    assert missing.status_code == 401
    assert missing.json()["error"]["code"] == "invalid_api_key"


async def test_the_right_key_works(keyed_server: LiveServer) -> None:
    with keyed_server.openai() as sdk:
        assert [m.id for m in sdk.models.list().data] == [keyed_server.model_name]
        reply = sdk.chat.completions.create(
            model=keyed_server.model_name, messages=MESSAGES, max_tokens=6, temperature=0
        )
    assert reply.choices[0].finish_reason in ("stop", "length")
    async with keyed_server.async_openai() as aclient:
        stream = await aclient.chat.completions.create(
            model=keyed_server.model_name, messages=MESSAGES, max_tokens=6, temperature=0, stream=True
        )
        async with stream:
            chunks = [chunk async for chunk in stream]
    texts, _, _ = collect_chat_stream(chunks)
    assert texts.get(0, "") == reply.choices[0].message.content
