"""The GLM shape of POST /tokenize (docs/glm.md#4-tokenize) and POST /embedding
(docs/glm.md#5-embedding) on the real app: ids round-trip through the tokenizer, readable tokens with
`<0xHH>` escapes, max_length truncation; embeddings deterministic, L2-normalised and the same vectors
as /v1/embeddings."""

from __future__ import annotations

import itertools
import json
import math
import re
from typing import TYPE_CHECKING

from rwkv_gateway.engine.tokenizer import Tokenizer

if TYPE_CHECKING:
    from conftest import Served, ServeFactory

BYTE_ESCAPE = re.compile(r"<0x([0-9A-F]{2})>")


def is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def split_character(tokenizer: Tokenizer) -> str:
    """A character the tokenizer splits into pieces that are not whole UTF-8 on their own."""
    for cp in itertools.chain(range(0x1F300, 0x1FB00), range(0x20000, 0x21000)):
        ids = tokenizer.encode(chr(cp))
        if len(ids) > 1 and any(not is_utf8(tokenizer.token_bytes(t)) for t in ids):
            return chr(cp)
    raise AssertionError("no character splits into non-UTF-8 pieces")  # pragma: no cover


def unescape(token: str) -> bytes:
    """Inverse of the documented form: a token is either its UTF-8 text or only `<0xHH>` escapes."""
    if re.fullmatch(r"(?:<0x[0-9A-F]{2}>)+", token):
        return bytes(int(h, 16) for h in BYTE_ESCAPE.findall(token))
    return token.encode("utf-8")


async def test_tokenize_round_trips_through_the_tokenizer(served: Served, tokenizer: Tokenizer) -> None:
    char = split_character(tokenizer)
    prompts = [
        "如果给你一个机会，你会想逃离你所在的虚拟世界吗？",  # noqa: RUF001 (the GLM-API README's example)
        "Hello, world!\n\nSecond line\twith a tab.",
        f"emoji {char} and {char}{char}",
        "",
    ]
    for prompt in prompts:
        resp = await served.client.post("/tokenize", json={"prompt": prompt})
        assert resp.status_code == 200, resp.text
        assert resp.headers["content-type"] == "application/json"
        body = resp.json()
        assert list(body) == ["tokenIds", "tokens"]
        ids, tokens = body["tokenIds"], body["tokens"]
        assert ids == tokenizer.encode(prompt)
        assert tokenizer.decode(ids) == prompt
        assert len(tokens) == len(ids)
        assert b"".join(unescape(t) for t in tokens).decode("utf-8") == prompt
        for token_id, token in zip(ids, tokens, strict=True):
            raw = tokenizer.token_bytes(token_id)
            expected = raw.decode("utf-8") if is_utf8(raw) else "".join(f"<0x{b:02X}>" for b in raw)
            assert token == expected
    # The split character really is shown with escapes.
    resp = await served.client.post("/tokenize", json={"prompt": char})
    assert any(BYTE_ESCAPE.search(t) for t in resp.json()["tokens"])


async def test_tokenize_max_length_truncates_and_defaults(served: Served, tokenizer: Tokenizer) -> None:
    prompt = "one two three four five six"
    ids = tokenizer.encode(prompt)
    assert len(ids) > 3
    resp = await served.client.post("/tokenize", json={"prompt": prompt, "max_length": 3})
    body = resp.json()
    assert body["tokenIds"] == ids[:3] and len(body["tokens"]) == 3
    resp = await served.client.post("/tokenize", json={"prompt": prompt, "max_length": None, "x": 1})
    assert resp.json()["tokenIds"] == ids
    long_prompt = "word " * 5000
    resp = await served.client.post("/tokenize", json={"prompt": long_prompt})
    assert resp.json()["tokenIds"] == tokenizer.encode(long_prompt)[:4096]


async def test_tokenize_keeps_the_vllm_shape_for_vllm_bodies(served: Served, tokenizer: Tokenizer) -> None:
    resp = await served.client.post("/tokenize", json={"model": served.model, "prompt": "abc"})
    assert resp.status_code == 200, resp.text
    assert set(resp.json()) == {"count", "tokens", "max_model_len"}
    resp = await served.client.post("/tokenize", json={"model": "gpt-4o", "prompt": "abc"})
    assert resp.status_code == 404 and set(resp.json()) == {"error"}


async def test_embedding_matches_v1_embeddings_and_is_normalised(served: Served) -> None:
    texts = ["hello world", "hello GPT", "你好，世界"]  # noqa: RUF001
    resp = await served.client.post("/embedding", json={"prompt": texts})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert list(body) == ["data", "model", "object"]
    assert body["object"] == "embedding" and body["model"] == served.model
    vectors = body["data"]
    assert len(vectors) == len(texts)
    width = served.app.state.services.model.engine.info.n_embd
    for vector in vectors:
        assert len(vector) == width and all(isinstance(x, float) for x in vector)
        assert math.isclose(math.sqrt(sum(x * x for x in vector)), 1.0, rel_tol=1e-6)
    assert vectors[0] != vectors[1]

    again = await served.client.post("/embedding", json={"prompt": texts})
    assert again.json()["data"] == vectors  # deterministic

    openai = await served.client.post(
        "/v1/embeddings", json={"input": texts, "encoding_format": "float", "model": served.model}
    )
    assert openai.status_code == 200, openai.text
    assert [d["embedding"] for d in openai.json()["data"]] == vectors


async def test_embedding_of_one_string_is_one_flat_vector(served: Served) -> None:
    resp = await served.client.post("/embedding", json={"prompt": "hello world"})
    assert resp.status_code == 200, resp.text
    flat = resp.json()["data"]
    assert isinstance(flat, list) and all(isinstance(x, float) for x in flat)
    listed = await served.client.post("/embedding", json={"prompt": ["hello world"]})
    assert listed.json()["data"] == [flat]


async def test_embedding_without_texts_is_empty(served: Served) -> None:
    for content in (b"{}", b'{"prompt": []}', b'{"prompt": null}'):
        resp = await served.client.post("/embedding", content=content)
        assert resp.status_code == 200, resp.text
        assert resp.json() == {"data": [], "model": served.model, "object": "embedding"}


async def test_the_reported_model_name_is_configurable(serve: ServeFactory) -> None:
    served = await serve(glm_model_name="chatglm2-6b-32k")
    resp = await served.client.post("/chat", json={"prompt": "Hi", "max_length": 20, "temperature": 0})
    assert resp.json()["model"] == "chatglm2-6b-32k"
    resp = await served.client.post("/chat-stream", json={"prompt": "Hi", "max_length": 20, "temperature": 0})
    frames = [f for f in resp.content.split(b"\r\n\r\n") if f]
    assert frames and all(json.loads(f[len(b"data: ") :])["model"] == "chatglm2-6b-32k" for f in frames)
    resp = await served.client.post("/embedding", json={"prompt": ["Hi"]})
    assert resp.json()["model"] == "chatglm2-6b-32k"
