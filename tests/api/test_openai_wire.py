"""The OpenAI dialect (and the shared /tokenize path) on the wire, through the real app: lifespan,
migrations, loader, engine and SQLite, driven by httpx over ASGITransport (which buffers whole
responses; fine for the SSE framing of finite streams)."""

from __future__ import annotations

import base64
import itertools
import json
import math
import re
import struct
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from rwkv_gateway.api.tokenize import readable_token
from rwkv_gateway.db.repo import RequestLogRepo
from rwkv_gateway.engine import admission as admission_mod
from rwkv_gateway.engine.sampler import Sampler
from rwkv_gateway.engine.tokenizer import Tokenizer

if TYPE_CHECKING:  # the fixtures' types (conftest modules are not importable by name at run time)
    from conftest import FullQueue, Served, ServeFactory

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
EMBEDDINGS = "/v1/embeddings"
HELLO = [{"role": "user", "content": "Hello, who are you?"}]
FAULT_SEED = 666


# ---------------------------------------------------------------------------- helpers


def sse_payloads(resp: httpx.Response) -> list[str]:
    """The data payloads of an OpenAI-style SSE body, checking the exact framing on the way:
    every event is one `data: <payload>` line followed by a blank line, nothing else, `[DONE]` last."""
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/event-stream")
    body = resp.text
    assert body.endswith("data: [DONE]\n\n"), body[-200:]
    assert "\r" not in body
    frames = body.split("\n\n")
    assert frames[-1] == ""
    payloads = []
    for frame in frames[:-1]:
        assert "\n" not in frame, f"multi-line event: {frame!r}"
        assert frame.startswith("data: "), f"not a data event: {frame!r}"
        payloads.append(frame[len("data: ") :])
    assert not any(line.startswith("event:") for line in body.split("\n"))
    assert payloads.count("[DONE]") == 1
    return payloads


def sse_chunks(resp: httpx.Response) -> list[dict[str, Any]]:
    """The JSON chunks of a stream that ended normally (`[DONE]` last)."""
    payloads = sse_payloads(resp)
    assert payloads[-1] == "[DONE]"
    return [json.loads(p) for p in payloads[:-1]]


def assert_envelope(
    resp: httpx.Response, status: int, *, param: Any = ..., code: Any = ...
) -> dict[str, Any]:
    assert resp.status_code == status, (resp.status_code, resp.text)
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == ("invalid_request_error" if status < 500 else "server_error")
    if param is not ...:
        assert error["param"] == param, error
    if code is not ...:
        assert error["code"] == code, error
    return dict(error)


def chat_body(**fields: Any) -> dict[str, Any]:
    return {"model": "tiny-v7", "messages": HELLO, "temperature": 0, "max_tokens": 12, **fields}


def is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def split_character(tokenizer: Tokenizer) -> tuple[str, list[int]]:
    """A character (emoji first, then rare CJK) that the tokenizer splits into pieces that are not
    whole UTF-8 on their own."""
    for cp in itertools.chain(range(0x1F300, 0x1FB00), range(0x20000, 0x21000)):
        ch = chr(cp)
        ids = tokenizer.encode(ch)
        if len(ids) > 1 and any(not is_utf8(tokenizer.token_bytes(t)) for t in ids):
            return ch, ids
    raise AssertionError("no character splits into non-UTF-8 pieces")  # pragma: no cover


# ---------------------------------------------------------------------------- chat completions: SSE


async def test_chat_stream_framing_and_usage_chunk(served: Served) -> None:
    client = served.client
    plain = await client.post(CHAT, json=chat_body(max_tokens=20))
    assert plain.status_code == 200, plain.text
    full = plain.json()
    assert full["object"] == "chat.completion" and full["model"] == served.model
    expected = full["choices"][0]["message"]["content"]

    resp = await client.post(
        CHAT, json=chat_body(max_tokens=20, stream=True, stream_options={"include_usage": True})
    )
    chunks = sse_chunks(resp)
    assert len(chunks) >= 3
    assert len({c["id"] for c in chunks}) == 1
    assert len({c["created"] for c in chunks}) == 1 and isinstance(chunks[0]["created"], int)
    assert {c["model"] for c in chunks} == {served.model}
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert chunks[0]["id"].startswith("chatcmpl-")

    *choice_chunks, usage_chunk = chunks
    assert usage_chunk["choices"] == []
    # The same counts; only prompt_tokens_details differs (the second request hits the prefix cache).
    assert {k: v for k, v in usage_chunk["usage"].items() if k != "prompt_tokens_details"} == {
        k: v for k, v in full["usage"].items() if k != "prompt_tokens_details"
    }
    assert usage_chunk["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    u = usage_chunk["usage"]
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    for chunk in choice_chunks:
        assert "usage" in chunk and chunk["usage"] is None
        assert len(chunk["choices"]) == 1 and chunk["choices"][0]["index"] == 0
    assert choice_chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all("role" not in c["choices"][0]["delta"] for c in choice_chunks[1:])
    finishes = [c["choices"][0]["finish_reason"] for c in choice_chunks]
    assert [f for f in finishes if f is not None] == [full["choices"][0]["finish_reason"]]
    assert finishes[-1] is not None
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in choice_chunks)
    assert streamed == expected


async def test_chat_stream_without_include_usage_has_no_usage_key(served: Served) -> None:
    resp = await served.client.post(CHAT, json=chat_body(stream=True))
    chunks = sse_chunks(resp)
    assert all("usage" not in c for c in chunks)
    assert all(len(c["choices"]) == 1 for c in chunks)
    assert sum(c["choices"][0]["finish_reason"] is not None for c in chunks) == 1


async def test_chat_stream_n2_carries_both_indices(served: Served) -> None:
    resp = await served.client.post(
        CHAT,
        json=chat_body(n=2, temperature=1.0, seed=7, stream=True, stream_options={"include_usage": True}),
    )
    chunks = sse_chunks(resp)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
    per_index: dict[int, list[dict[str, Any]]] = {}
    for chunk in chunks[:-1]:
        assert len(chunk["choices"]) == 1
        choice = chunk["choices"][0]
        per_index.setdefault(choice["index"], []).append(choice)
    assert set(per_index) == {0, 1}
    for choices in per_index.values():
        assert choices[0]["delta"].get("role") == "assistant"
        assert sum(c["finish_reason"] is not None for c in choices) == 1
        assert choices[-1]["finish_reason"] in ("stop", "length")

    plain = await served.client.post(CHAT, json=chat_body(n=2, temperature=1.0, seed=7))
    assert plain.status_code == 200
    assert [c["index"] for c in plain.json()["choices"]] == [0, 1]


# ---------------------------------------------------------------------------- chat prompt template


async def test_chat_prompt_template_counts_the_rendered_prompt(served: Served, tokenizer: Tokenizer) -> None:
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "system", "content": "Answer briefly."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "RWKV?"}],
        },
        {"role": "assistant", "content": "An RNN with transformer-level performance."},
        {"role": "user", "content": "Tell me more."},
    ]
    resp = await served.client.post(CHAT, json=chat_body(messages=messages, max_tokens=2))
    assert resp.status_code == 200, resp.text
    rendered = (
        "System: You are a helpful assistant.\n\n"
        "System: Answer briefly.\n\n"
        "User: What is RWKV?\n\n"
        "Assistant: An RNN with transformer-level performance.\n\n"
        "User: Tell me more.\n\n"
        "Assistant:"
    )
    usage = resp.json()["usage"]
    assert usage["prompt_tokens"] == len(tokenizer.encode(rendered))
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def test_non_text_content_part_is_a_400_on_messages(served: Served) -> None:
    content = [
        {"type": "text", "text": "What is in this picture?"},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
    ]
    resp = await served.client.post(CHAT, json=chat_body(messages=[{"role": "user", "content": content}]))
    assert_envelope(resp, 400, param="messages")


# ---------------------------------------------------------------------------- error envelope


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": None}, "messages"),
        ({"temperature": 5}, "temperature"),
        ({"top_p": 2}, "top_p"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"logit_bias": {"not-a-token": 5}}, "logit_bias"),
    ],
    ids=["empty-messages", "null-messages", "temperature-5", "top_p-2", "five-stops", "logit-bias-key"],
)
async def test_bad_chat_values_are_400_envelopes(served: Served, change: dict[str, Any], param: str) -> None:
    resp = await served.client.post(CHAT, json=chat_body(**change))
    assert_envelope(resp, 400, param=param)


async def test_missing_messages_is_missing_required_parameter(served: Served) -> None:
    resp = await served.client.post(CHAT, json={"model": served.model, "max_tokens": 4})
    assert_envelope(resp, 400, param="messages", code="missing_required_parameter")


async def test_unknown_route_and_wrong_method_under_v1_use_the_envelope(served: Served) -> None:
    assert_envelope(await served.client.post("/v1/no-such-route", json={}), 404)
    assert_envelope(await served.client.get(CHAT), 405)


async def test_max_tokens_above_the_server_limit_names_the_limit(served: Served) -> None:
    limit = served.settings.max_new_tokens
    resp = await served.client.post(CHAT, json=chat_body(max_tokens=limit + 1))
    error = assert_envelope(resp, 400, param="max_tokens")
    assert str(limit) in error["message"]
    resp = await served.client.post(CHAT, json=chat_body(max_tokens=None, max_completion_tokens=limit + 1))
    error = assert_envelope(resp, 400, param="max_completion_tokens")
    assert str(limit) in error["message"]
    resp = await served.client.post(COMPLETIONS, json={"prompt": "Hi", "max_tokens": limit + 1})
    error = assert_envelope(resp, 400, param="max_tokens")
    assert str(limit) in error["message"]


async def test_unknown_model_is_404_model_not_found(served: Served) -> None:
    for resp in (
        await served.client.post(CHAT, json=chat_body(model="gpt-4o")),
        await served.client.post(COMPLETIONS, json={"model": "gpt-4o", "prompt": "Hi"}),
        await served.client.post(EMBEDDINGS, json={"model": "gpt-4o", "input": "Hi"}),
        await served.client.get("/v1/models/gpt-4o"),
    ):
        error = assert_envelope(resp, 404, param="model", code="model_not_found")
        assert "gpt-4o" in error["message"]
    listed = (await served.client.get("/v1/models")).json()
    assert [m["id"] for m in listed["data"]] == [served.model]
    assert (await served.client.get(f"/v1/models/{served.model}")).json()["id"] == served.model


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS, EMBEDDINGS])
async def test_body_that_is_not_json_is_400(served: Served, path: str) -> None:
    resp = await served.client.post(
        path, content=b"{this is not json", headers={"content-type": "application/json"}
    )
    assert_envelope(resp, 400)
    resp = await served.client.post(
        path, content=b"\xff\xfe garbage", headers={"content-type": "application/json"}
    )
    assert_envelope(resp, 400)


async def test_body_over_max_body_bytes_is_413(serve: ServeFactory) -> None:
    served = await serve(max_body_bytes=2048)
    big = json.dumps(chat_body(messages=[{"role": "user", "content": "x" * 4000}])).encode()
    resp = await served.client.post(CHAT, content=big, headers={"content-type": "application/json"})
    assert "content-length" in resp.request.headers
    assert_envelope(resp, 413)

    async def chunked() -> AsyncIterator[bytes]:
        for i in range(0, len(big), 512):
            yield big[i : i + 512]

    resp = await served.client.post(CHAT, content=chunked(), headers={"content-type": "application/json"})
    assert "content-length" not in resp.request.headers
    assert resp.request.headers.get("transfer-encoding") == "chunked"
    assert_envelope(resp, 413)

    small = await served.client.post(CHAT, json=chat_body(max_tokens=2))
    assert small.status_code == 200, small.text


async def test_prompt_over_max_prompt_tokens_is_context_length_exceeded(
    serve: ServeFactory, tokenizer: Tokenizer
) -> None:
    served = await serve(max_prompt_tokens=32)
    content = "The quick brown fox jumps over the lazy dog. " * 8
    n_tokens = len(tokenizer.encode(f"User: {content.strip()}\n\nAssistant:"))
    assert n_tokens > 32
    resp = await served.client.post(CHAT, json=chat_body(messages=[{"role": "user", "content": content}]))
    error = assert_envelope(resp, 400, code="context_length_exceeded")
    assert str(n_tokens) in error["message"] and "32" in error["message"]
    resp = await served.client.post(COMPLETIONS, json={"prompt": content})
    error = assert_envelope(resp, 400, code="context_length_exceeded")
    assert str(len(tokenizer.encode(content))) in error["message"] and "32" in error["message"]


async def test_completions_suffix_is_400(served: Served) -> None:
    resp = await served.client.post(COMPLETIONS, json={"prompt": "def f(", "suffix": "return x"})
    assert_envelope(resp, 400, param="suffix")


async def test_unknown_fields_and_sillytavern_extensions_are_accepted(served: Served) -> None:
    body = chat_body(
        max_tokens=4,
        temperature=0.8,
        frobnicate=True,
        made_up={"nested": [1, 2, 3]},
        another_unknown_field="x",
        top_k=40,
        min_p=0.05,
        repetition_penalty=1.1,
        penalty_decay=0.996,
        mirostat_mode=2,
        mirostat_tau=5.0,
        seed=3,
        user="someone",
        metadata={"k": "v"},
        store=False,
        parallel_tool_calls=False,
        service_tier="auto",
    )
    resp = await served.client.post(CHAT, json=body)
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["finish_reason"] in ("stop", "length")
    resp = await served.client.post(
        COMPLETIONS, json={"prompt": "Hi", "max_tokens": 4, "top_k": 40, "min_p": 0.1, "wat": 1}
    )
    assert resp.status_code == 200, resp.text


# ---------------------------------------------------------------------------- queue full


async def test_queue_full_is_503_with_retry_after(serve: ServeFactory, full_queue: FullQueue) -> None:
    served = await serve(queue_size=1, max_batch_size=1)
    async with full_queue(served.app.state.services.model.engine):
        resp = await served.client.post(CHAT, json=chat_body())
        error = assert_envelope(resp, 503, code="overloaded")
        assert int(resp.headers["retry-after"]) >= 1
        assert resp.headers.get("x-should-retry") != "false"
        assert error["type"] == "server_error"
        resp = await served.client.post(CHAT, json=chat_body(stream=True))
        assert_envelope(resp, 503, code="overloaded")
        assert resp.headers["retry-after"]
    resp = await served.client.post(CHAT, json=chat_body(max_tokens=2))
    assert resp.status_code == 200, resp.text


# ---------------------------------------------------------------------------- failure after the start


async def test_failure_after_the_first_token_is_in_band(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    class FaultySampler(Sampler):  # fault injection: the second token of a marked request fails
        calls = 0

        def sample(self, logits):  # type: ignore[no-untyped-def]
            if self.params.seed == FAULT_SEED:
                self.calls += 1
                if self.calls > 1:
                    raise RuntimeError("injected sampling fault")
            return super().sample(logits)

    monkeypatch.setattr(admission_mod, "Sampler", FaultySampler)
    body = chat_body(max_tokens=20, seed=FAULT_SEED)

    resp = await served.client.post(CHAT, json={**body, "stream": True})
    payloads = sse_payloads(resp)
    assert payloads[-1] == "[DONE]"
    error_event = json.loads(payloads[-2])
    assert set(error_event) == {"error"}
    error = error_event["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "server_error" and "injected sampling fault" in error["message"]
    chunks = [json.loads(p) for p in payloads[:-2]]
    assert chunks and chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks)

    resp = await served.client.post(CHAT, json=body)
    error = assert_envelope(resp, 500)
    assert resp.headers["x-should-retry"] == "false"

    resp = await served.client.post(COMPLETIONS, json={"prompt": "Hi", "seed": FAULT_SEED, "stream": True})
    payloads = sse_payloads(resp)
    assert "error" in json.loads(payloads[-2])

    resp = await served.client.post(CHAT, json=chat_body(max_tokens=3))  # others are unaffected
    assert resp.status_code == 200, resp.text


# ---------------------------------------------------------------------------- /v1/completions


async def test_completions_prompts_echo_and_default_max_tokens(served: Served, tokenizer: Tokenizer) -> None:
    client = served.client

    async def complete(**fields: Any) -> dict[str, Any]:
        resp = await client.post(COMPLETIONS, json={"model": served.model, "temperature": 0, **fields})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
        u = body["usage"]
        assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
        return dict(body)

    a = await complete(prompt="The capital of France is")
    assert a["usage"]["completion_tokens"] == 16  # the default max_tokens
    assert a["choices"][0]["finish_reason"] == "length"
    assert a["usage"]["prompt_tokens"] == len(tokenizer.encode("The capital of France is"))
    text_a = a["choices"][0]["text"]
    b = await complete(prompt="Once upon a time", max_tokens=6)
    text_b = b["choices"][0]["text"]

    both = await complete(prompt=["The capital of France is", "Once upon a time"], max_tokens=6, n=2)
    assert [c["index"] for c in both["choices"]] == [0, 1, 2, 3]
    texts = [c["text"] for c in both["choices"]]
    short_a = (await complete(prompt="The capital of France is", max_tokens=6))["choices"][0]["text"]
    assert texts == [short_a, short_a, text_b, text_b]  # prompt-major
    assert text_a.startswith(short_a)

    ids = tokenizer.encode("The capital of France is")
    by_ids = await complete(prompt=ids)
    assert by_ids["choices"][0]["text"] == text_a
    assert by_ids["usage"]["prompt_tokens"] == len(ids)

    echoed = await complete(prompt="The capital of France is", echo=True)
    assert echoed["choices"][0]["text"] == "The capital of France is" + text_a

    resp = await client.post(
        COMPLETIONS, json={"prompt": "The capital of France is", "temperature": 0, "stream": True}
    )
    chunks = sse_chunks(resp)
    assert "".join(c["choices"][0]["text"] for c in chunks) == text_a
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]] == [
        "length"
    ]


# ---------------------------------------------------------------------------- /v1/embeddings


async def test_embeddings_float_and_base64(served: Served) -> None:
    client = served.client

    async def embed(**fields: Any) -> dict[str, Any]:
        resp = await client.post(EMBEDDINGS, json={"model": served.model, "input": "Hello world", **fields})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["object"] == "list" and body["model"] == served.model
        assert body["usage"]["prompt_tokens"] > 0
        assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"]
        return dict(body)

    floats = (await embed(encoding_format="float"))["data"][0]
    assert floats["object"] == "embedding" and floats["index"] == 0
    vector = floats["embedding"]
    assert isinstance(vector, list) and len(vector) > 16
    assert math.isclose(math.sqrt(sum(x * x for x in vector)), 1.0, rel_tol=1e-5)

    encoded = (await embed(encoding_format="base64"))["data"][0]["embedding"]
    assert isinstance(encoded, str)
    raw = base64.b64decode(encoded, validate=True)
    assert len(raw) == 4 * len(vector)
    decoded = struct.unpack(f"<{len(vector)}f", raw)
    assert decoded == pytest.approx(vector, abs=1e-6)
    assert decoded == tuple(struct.unpack(f"<{len(vector)}f", struct.pack(f"<{len(vector)}f", *vector)))

    again = (await embed(encoding_format="float"))["data"][0]["embedding"]
    assert again == vector

    short = (await embed(dimensions=16))["data"][0]["embedding"]
    assert len(short) == 16
    assert math.isclose(math.sqrt(sum(x * x for x in short)), 1.0, rel_tol=1e-5)
    head_norm = math.sqrt(sum(x * x for x in vector[:16]))
    assert short == pytest.approx([x / head_norm for x in vector[:16]], abs=1e-6)

    several = await embed(input=["Hello world", "Goodbye"])
    assert [d["index"] for d in several["data"]] == [0, 1]
    assert several["data"][0]["embedding"] == pytest.approx(vector, abs=1e-6)

    resp = await client.post(EMBEDDINGS, json={"input": "Hello world", "dimensions": len(vector) + 1})
    assert_envelope(resp, 400, param="dimensions")
    resp = await client.post(EMBEDDINGS, json={"input": ""})
    assert_envelope(resp, 400, param="input")
    resp = await client.post(EMBEDDINGS, json={"input": ["ok", ""]})
    assert_envelope(resp, 400, param="input")


# ---------------------------------------------------------------------------- /tokenize, /detokenize


async def test_vllm_tokenize_and_detokenize(served: Served, tokenizer: Tokenizer) -> None:
    client = served.client
    resp = await client.post("/tokenize", json={"model": served.model, "prompt": "Hello, world!"})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert set(body) == {"count", "tokens", "max_model_len"}
    assert body["tokens"] == tokenizer.encode("Hello, world!")
    assert body["count"] == len(body["tokens"])
    assert body["max_model_len"] == served.settings.max_prompt_tokens

    messages = [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "Hi"}]
    resp = await client.post("/tokenize", json={"model": served.model, "messages": messages})
    assert resp.status_code == 200, resp.text
    assert resp.json()["tokens"] == tokenizer.encode("System: Be nice.\n\nUser: Hi\n\nAssistant:")

    resp = await client.post("/tokenize", json={"add_special_tokens": False, "prompt": "abc"})
    assert resp.json()["tokens"] == tokenizer.encode("abc")
    resp = await client.post("/tokenize", json={"model": "gpt-4o", "prompt": "abc"})
    assert_envelope(resp, 404, param="model", code="model_not_found")

    text = "Round trip: 你好, world! 🦜"
    ids = tokenizer.encode(text)
    resp = await client.post("/detokenize", json={"model": served.model, "tokens": ids})
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"prompt": text}
    resp = await client.post("/detokenize", json={"tokens": [10**9]})
    assert_envelope(resp, 400, param="tokens")


async def test_vllm_tokenize_non_text_part_is_a_400_on_messages(served: Served) -> None:
    content = [{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]
    resp = await served.client.post(
        "/tokenize", json={"model": served.model, "messages": [{"role": "user", "content": content}]}
    )
    assert_envelope(resp, 400, param="messages")


async def test_glm_tokenize_shape_and_byte_tokens(served: Served, tokenizer: Tokenizer) -> None:
    char, char_ids = split_character(tokenizer)
    prompt = f"Hi {char}!"
    resp = await served.client.post("/tokenize", json={"prompt": prompt})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert set(body) == {"tokenIds", "tokens"}
    ids = tokenizer.encode(prompt)
    assert body["tokenIds"] == ids
    assert len(body["tokens"]) == len(ids)
    byte_piece = re.compile(r"^(?:<0x[0-9A-F]{2}>)+$")
    rebuilt = b""
    saw_bytes = False
    for token_id, piece in zip(ids, body["tokens"], strict=True):
        raw = tokenizer.token_bytes(token_id)
        if is_utf8(raw):
            assert piece == raw.decode("utf-8")
            rebuilt += raw
        else:
            saw_bytes = True
            assert byte_piece.match(piece), piece
            rebuilt += bytes(int(h, 16) for h in re.findall(r"<0x([0-9A-F]{2})>", piece))
    assert saw_bytes
    assert rebuilt.decode("utf-8") == prompt
    assert set(char_ids) <= set(ids)

    bad = next(t for t in char_ids if not is_utf8(tokenizer.token_bytes(t)))
    expected = "".join(f"<0x{b:02X}>" for b in tokenizer.token_bytes(bad))
    assert readable_token(tokenizer, bad) == expected

    resp = await served.client.post("/tokenize", json={"prompt": "one two three four", "max_length": 2})
    assert resp.json()["tokenIds"] == tokenizer.encode("one two three four")[:2]


@pytest.mark.parametrize(
    "content",
    [b"not json", b"[1, 2, 3]", b'{"prompt": 5}', b"{}", b'{"prompt": "x", "max_length": 0}'],
    ids=["not-json", "not-object", "prompt-not-str", "no-prompt", "bad-max-length"],
)
async def test_glm_tokenize_bad_body_is_400_detail(served: Served, content: bytes) -> None:
    resp = await served.client.post(
        "/tokenize", content=content, headers={"content-type": "application/json"}
    )
    assert resp.status_code == 400, resp.text
    body = resp.json()
    assert set(body) == {"detail"} and isinstance(body["detail"], str) and body["detail"]


# ---------------------------------------------------------------------------- request log


async def test_openai_requests_are_logged(served: Served) -> None:
    client = served.client
    assert (await client.post(CHAT, json=chat_body(max_tokens=3, user="alice"))).status_code == 200
    assert (await client.post(CHAT, json=chat_body(max_tokens=3, stream=True))).status_code == 200
    assert (await client.post(COMPLETIONS, json={"prompt": "Hi", "max_tokens": 3})).status_code == 200
    await served.app.state.services.request_log.flush()
    async with served.app.state.services.storage.sessions() as session:
        rows = await RequestLogRepo(session).recent(20, dialect="openai")
    assert len(rows) == 3
    assert all(r.dialect == "openai" and r.prompt_tokens > 0 for r in rows)
    assert {r.completion_tokens for r in rows} <= {1, 2, 3}
    assert "alice" in {r.user for r in rows}


# ---------------------------------------------------------------------------- CORS


async def test_cors_preflight_only_when_configured(serve: ServeFactory) -> None:
    preflight = {
        "Origin": "http://example.com",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    with_cors = await serve(cors_origins=["http://example.com"])
    resp = await with_cors.client.options(CHAT, headers=preflight)
    assert resp.status_code == 200, resp.text
    assert resp.headers["access-control-allow-origin"] == "http://example.com"
    assert "POST" in resp.headers["access-control-allow-methods"]
    resp = await with_cors.client.post(
        CHAT, json=chat_body(max_tokens=2), headers={"Origin": "http://example.com"}
    )
    assert resp.headers["access-control-allow-origin"] == "http://example.com"

    without = await serve()
    resp = await without.client.options(CHAT, headers=preflight)
    assert "access-control-allow-origin" not in resp.headers
    assert resp.status_code != 500
