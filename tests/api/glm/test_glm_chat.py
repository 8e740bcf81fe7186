"""POST /chat and /chat-stream through the real app and engine: response shape and counts, the
stream rebuilt with `+=` equals the one-shot reply, history forms, max_length, defaults, and
multi-turn prefix-cache reuse (docs/glm.md, sections 1-3)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from glmwire import KEYS, PING, Spy, stream_chat

from rwkv_gateway.db.repo import RequestLogRepo
from rwkv_gateway.domain.prompts import ChatMessage, ChatTemplate
from rwkv_gateway.engine.tokenizer import Tokenizer
from support import idle

if TYPE_CHECKING:
    from conftest import Served, ServeFactory

TEMPLATE = ChatTemplate()
PROMPT = "蓝牙耳机坏了我应该去医院看什么科？"  # noqa: RUF001 (the GLM-API README's example)


def segments(*turns: tuple[str, str]) -> tuple[str, ...]:
    return TEMPLATE.segments([ChatMessage(role, text) for role, text in turns])


def formatted_tokens(tokenizer: Tokenizer, pieces: tuple[str, ...]) -> int:
    return sum(len(tokenizer.encode(p)) for p in pieces)


async def chat(served: Served, **body: Any) -> dict[str, Any]:
    resp = await served.client.post("/chat", json=body)
    assert resp.status_code == 200, resp.text
    data: dict[str, Any] = resp.json()
    return data


async def test_chat_shape_counts_and_bytes(served: Served, tokenizer: Tokenizer) -> None:
    resp = await served.client.post("/chat", json={"prompt": PROMPT, "temperature": 0, "max_length": 60})
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "application/json"
    body = resp.json()
    assert list(body) == KEYS
    assert body["object"] == "chat.completion" and body["model"] == served.model
    assert body["prompt_tokens"] == len(tokenizer.encode(PROMPT))
    assert body["total_tokens"] == body["prompt_tokens"] + body["completion_tokens"]
    assert body["content"] and body["content"] == body["content"].strip()
    assert body["completion_tokens"] >= 1
    # Compact JSON with raw UTF-8, as the reference sends it.
    assert resp.content == json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


async def test_stream_concatenated_with_plus_equals_is_the_one_shot_reply(served: Served) -> None:
    body = {
        "prompt": "Hello, who are you?",
        "history": [["Hi", "Hello!"]],
        "temperature": 0,
        "max_length": 80,
    }
    whole = await chat(served, **body)
    streamed = await stream_chat(served.client, body)

    assert streamed.content == whole["content"]
    assert len(streamed.events) > 1
    last = streamed.events[-1]
    assert {k: last[k] for k in KEYS if k != "content"} == {k: whole[k] for k in KEYS if k != "content"}
    assert {e["prompt_tokens"] for e in streamed.events} == {whole["prompt_tokens"]}
    counts = [e["completion_tokens"] for e in streamed.events]
    assert counts == sorted(counts) and len(set(counts)) == len(counts)  # cumulative, growing
    assert all(e["total_tokens"] == e["prompt_tokens"] + e["completion_tokens"] for e in streamed.events)
    assert {e["model"] for e in streamed.events} == {served.model}
    assert {e["object"] for e in streamed.events} == {"chat.completion"}
    assert all("\ufffd" not in e["content"] for e in streamed.events)  # whole characters only

    headers = streamed.headers
    assert headers is not None
    assert headers["content-type"] == "text/event-stream; charset=utf-8"
    assert headers["cache-control"] == "no-cache"
    assert headers["x-accel-buffering"] == "no"
    assert headers["connection"] == "keep-alive"
    # No terminator and nothing but data events: no [DONE], event:, id: or retry: lines.
    assert streamed.comments == []
    assert streamed.raw.endswith(b"}\r\n\r\n")
    assert b"[DONE]" not in streamed.raw
    for line in streamed.raw.split(b"\r\n"):
        assert line == b"" or line.startswith(b"data: {"), line


async def test_keep_alive_pings_are_comments_in_the_reference_format(
    serve: ServeFactory, monkeypatch: Any
) -> None:
    import threading

    from rwkv_gateway.api.glm import serving
    from rwkv_gateway.engine import admission as admission_mod
    from rwkv_gateway.engine.sampler import Sampler

    pinged = threading.Event()
    real_ping = serving.ping_text

    def ping_text() -> str:
        pinged.set()
        return real_ping()

    class WaitForPing(Sampler):  # fault injection: the reply waits until a ping went out
        def sample(self, logits):  # type: ignore[no-untyped-def]
            assert pinged.wait(30)
            return super().sample(logits)

    monkeypatch.setattr(serving, "ping_text", ping_text)
    monkeypatch.setattr(admission_mod, "Sampler", WaitForPing)
    served = await serve(glm_ping_s=0.01)
    streamed = await stream_chat(served.client, {"prompt": "Hi", "temperature": 0, "max_length": 20})
    assert streamed.comments, "no keep-alive ping"
    assert all(PING.match(c) for c in streamed.comments), streamed.comments
    assert streamed.content == (await chat(served, prompt="Hi", temperature=0, max_length=20))["content"]


async def test_history_forms_give_the_same_prompt_and_reply(served: Served, tokenizer: Tokenizer) -> None:
    spy = Spy(served.app.state.services.model.engine)
    base = {"prompt": "And now?", "temperature": 0, "max_length": 60}
    pairs = await chat(served, **base, history=[["q1", "a1"], ["q2", "a2"]])
    pairs_segments = spy.last.prompt_segments
    flat = await chat(served, **base, history=[["q1", "a1", "q2", "a2"]])
    flat_segments = spy.last.prompt_segments
    unpaired = await chat(served, **base, history=[["q1", "a1", "q2", "a2", "dangling"]])
    assert pairs_segments == flat_segments == spy.last.prompt_segments
    assert pairs_segments == segments(
        ("user", "q1"), ("assistant", "a1"), ("user", "q2"), ("assistant", "a2"), ("user", "And now?")
    )
    assert pairs == flat == unpaired

    # Empty texts are skipped: a transcript stuffed into one answer, an empty prompt.
    await chat(served, prompt="", history=[["", "Earlier, we talked."]], temperature=0, max_length=40)
    assert spy.last.prompt_segments == segments(("assistant", "Earlier, we talked."))
    await chat(served, prompt="Hi", history=[], temperature=0, max_length=40)
    assert spy.last.prompt_segments == segments(("user", "Hi"))
    # The GLM-API README's client sends "text\n" prompts; they are normalised like any message.
    await chat(served, prompt="Hi\n", history=[["Be brief.\n", "yes"]], temperature=0, max_length=40)
    assert spy.last.prompt_segments == segments(("user", "Be brief."), ("assistant", "yes"), ("user", "Hi"))


async def test_missing_and_null_fields_take_the_reference_defaults(
    serve: ServeFactory, tokenizer: Tokenizer
) -> None:
    # The reply budget is capped by the server so the random model does not write 4000 tokens.
    served = await serve(max_new_tokens=6)
    spy = Spy(served.app.state.services.model.engine)
    expected = segments(("user", "Hi"))
    for body in (
        {"prompt": "Hi"},
        {"prompt": "Hi", "history": None, "max_length": None, "top_p": None, "temperature": None},
        {"prompt": "Hi", "unknown": {"nested": True}, "stream": True},
    ):
        resp = await served.client.post("/chat", json=body)
        assert resp.status_code == 200, resp.text
        request = spy.last
        assert request.prompt_segments == expected
        assert request.sampling.temperature == 0.95 and request.sampling.top_p == 0.7
        assert request.max_tokens == 6
        assert request.stop == TEMPLATE.stops and request.dialect == "glm"
        assert request.reply_followup is not None and request.reply_followup("a ") == " a\n\n"
    # The default max_length is 4096 tokens, prompt and history included.
    long_prompt = "lorem ipsum " * 2100
    n = formatted_tokens(tokenizer, segments(("user", long_prompt)))
    assert n > 4096
    resp = await served.client.post("/chat", json={"prompt": long_prompt})
    assert resp.status_code == 400
    assert resp.json() == {
        "detail": f"max_length: 4096 leaves no room for a reply: the formatted prompt (history included) "
        f"has {n} tokens"
    }


async def test_a_body_is_json_whatever_its_content_type(served: Served) -> None:
    # curl -d '{...}' sends application/x-www-form-urlencoded; the reference reads it as JSON anyway.
    body = json.dumps({"prompt": "Hi", "temperature": 0, "max_length": 30}).encode()
    resp = await served.client.post(
        "/chat", content=body, headers={"content-type": "application/x-www-form-urlencoded"}
    )
    assert resp.status_code == 200, resp.text
    assert resp.json() == await chat(served, prompt="Hi", temperature=0, max_length=30)


async def test_max_length_bounds_prompt_plus_reply(serve: ServeFactory, tokenizer: Tokenizer) -> None:
    served = await serve(max_new_tokens=20)
    spy = Spy(served.app.state.services.model.engine)
    history = [["What is two plus two?", "Four."]]
    pieces = segments(("user", "What is two plus two?"), ("assistant", "Four."), ("user", "And three?"))
    n = formatted_tokens(tokenizer, pieces)

    body = await chat(served, prompt="And three?", history=history, max_length=n + 3, temperature=0)
    assert spy.last.max_tokens == 3
    assert body["completion_tokens"] <= 3
    await chat(served, prompt="And three?", history=history, max_length=n + 1, temperature=0)
    assert spy.last.max_tokens == 1
    # A larger budget than the server allows per reply is capped, not refused.
    await chat(served, prompt="And three?", history=history, max_length=32768, temperature=0)
    assert spy.last.max_tokens == 20

    for too_small in (n, n - 1, 1):
        resp = await served.client.post(
            "/chat", json={"prompt": "And three?", "history": history, "max_length": too_small}
        )
        assert resp.status_code == 400, resp.text
        detail = resp.json()["detail"]
        assert detail.startswith("max_length: ") and str(n) in detail and str(too_small) in detail
        resp = await served.client.post(
            "/chat-stream", json={"prompt": "And three?", "history": history, "max_length": too_small}
        )
        assert resp.status_code == 400 and resp.json()["detail"] == detail


async def test_greedy_reply_is_deterministic_and_sampling_knobs_apply(served: Served) -> None:
    spy = Spy(served.app.state.services.model.engine)
    first = await chat(served, prompt="Tell me a story.", temperature=0, max_length=40)
    second = await chat(served, prompt="Tell me a story.", temperature=0, max_length=40)
    assert first == second
    await chat(served, prompt="Tell me a story.", temperature=1.3, top_p=0.2, max_length=30)
    assert spy.last.sampling.temperature == 1.3 and spy.last.sampling.top_p == 0.2


async def test_multi_turn_requests_prefill_only_the_new_turn(served: Served, tokenizer: Tokenizer) -> None:
    engine = served.app.state.services.model.engine
    questions = ["What is the capital of France?", "And of Italy?", "And of Spain?"]
    history: list[list[str]] = []
    pairs: list[tuple[str, str]] = []
    for turn, question in enumerate(questions):
        turns: list[tuple[str, str]] = []
        for q, a in pairs:
            turns += [("user", q), ("assistant", a)]
        whole = segments(*turns, ("user", question))
        new = segments(("user", question))
        budget = formatted_tokens(tokenizer, whole) + 12  # a reply of at most 12 tokens
        before = dict(engine.stats())
        body = await chat(served, prompt=question, history=history, temperature=0, max_length=budget)
        await idle(served.app.state.services.model.engine)
        after = engine.stats()
        prefilled = after["prompt_tokens"] - before["prompt_tokens"]
        cached = after["cached_tokens"] - before["cached_tokens"]
        if turn == 0:
            assert cached == 0
        else:
            assert prefilled == formatted_tokens(tokenizer, new), (turn, prefilled)
            assert cached == formatted_tokens(tokenizer, whole) - prefilled, (turn, cached)
        assert body["content"]
        pairs.append((question, body["content"]))
        # Later turns resend the history in the flattened form the GLM-API README's client uses.
        history = [[text for pair in pairs for text in pair]]
    assert engine.stats()["followup_tokens"] > 0


async def test_chat_requests_are_logged_as_glm(served: Served) -> None:
    await chat(served, prompt="Hi", temperature=0, max_length=20)
    await stream_chat(served.client, {"prompt": "Hi", "temperature": 0, "max_length": 20})
    await served.app.state.services.request_log.flush()
    async with served.app.state.services.storage.sessions() as session:
        rows = await RequestLogRepo(session).recent(10, dialect="glm")
    assert len(rows) == 2
    assert all(r.prompt_tokens > 0 for r in rows)
