"""Prefix state reuse through /v1/chat/completions: a conversation that resends its history each
turn prefills only its new messages, and gives exactly the text it gives with the cache off."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rwkv_gateway.domain.prompts import ChatMessage, ChatTemplate
from rwkv_gateway.engine.tokenizer import Tokenizer
from support import idle

if TYPE_CHECKING:
    from tests.api.conftest import Served, ServeFactory

QUESTIONS = [f"Question {i}: what is {i} times {i + 1}?" for i in range(10)]


async def conversation(served: Served) -> tuple[list[str], list[dict[str, Any]]]:
    history: list[dict[str, str]] = [{"role": "system", "content": "You are terse."}]
    replies: list[str] = []
    usages: list[dict[str, Any]] = []
    for question in QUESTIONS:
        history.append({"role": "user", "content": question})
        body = {"messages": history, "max_tokens": 12, "temperature": 0}
        resp = await served.client.post("/v1/chat/completions", json=body)
        assert resp.status_code == 200, resp.text
        data = resp.json()
        reply = data["choices"][0]["message"]["content"]
        replies.append(reply)
        usages.append(data["usage"])
        history.append({"role": "assistant", "content": reply})
        await idle(served.app.state.services.model.engine)
    return replies, usages


async def test_ten_turns_prefill_only_new_tokens_and_match_the_uncached_text(
    serve: ServeFactory, tokenizer: Tokenizer
) -> None:
    cached = await serve()
    uncached = await serve(prefix_cache=False)
    with_cache, usages = await conversation(cached)
    without_cache, plain_usages = await conversation(uncached)
    assert with_cache == without_cache
    assert all(u["prompt_tokens_details"]["cached_tokens"] == 0 for u in plain_usages)

    template = ChatTemplate()
    for turn, usage in enumerate(usages):
        assert usage["prompt_tokens"] == plain_usages[turn]["prompt_tokens"]
        prefilled = usage["prompt_tokens"] - usage["prompt_tokens_details"]["cached_tokens"]
        if turn == 0:
            assert prefilled == usage["prompt_tokens"]  # a cold cache
            continue
        new_turn = template.segments([ChatMessage("user", QUESTIONS[turn])])
        expected_new = sum(len(tokenizer.encode(piece)) for piece in new_turn)
        assert prefilled == expected_new, (turn, usage)
    stats = cached.app.state.services.model.engine.stats()
    assert stats["cached_tokens"] > 0 and stats["followup_tokens"] > 0


async def test_a_shared_system_prompt_is_prefilled_once(serve: ServeFactory) -> None:
    served = await serve()
    system = {"role": "system", "content": "A long shared preamble. " * 20}
    first = await served.client.post(
        "/v1/chat/completions",
        json={"messages": [system, {"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0},
    )
    second = await served.client.post(
        "/v1/chat/completions",
        json={"messages": [system, {"role": "user", "content": "bye"}], "max_tokens": 2, "temperature": 0},
    )
    assert first.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    cached = second.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached > 100  # the preamble's state was reused for a different user message
