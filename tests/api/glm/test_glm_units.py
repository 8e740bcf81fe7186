"""Pure pieces of the ChatGLM-style dialect: the exact event bytes of docs/glm.md#3-chat-stream, comments and
pings, history pairing, field paths in error details, and the reply pieces' token counts."""

from __future__ import annotations

import re

import pytest
from glmwire import PING

from rwkv_gateway.api.glm.errors import GLMErrors, detail, field_path
from rwkv_gateway.api.glm.schemas import GLMChatRequest
from rwkv_gateway.api.glm.serving import (
    ReplyPieces,
    chat_messages,
    comment,
    dumps_event,
    history_pairs,
    ping_text,
)
from rwkv_gateway.domain.prompts import ChatMessage, ChatTemplate
from rwkv_gateway.engine.tokenizer import Tokenizer
from rwkv_gateway.errors import InvalidParameter, NotReady, ServerBusy


def test_event_bytes_are_the_reference_bytes() -> None:
    # The byte layout of docs/glm.md#3-chat-stream, exactly.
    first = {"content": "E", "prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}
    second = {"content": "c", "prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}
    tail = {"model": "chatglm2-6b-32k", "object": "chat.completion"}
    assert dumps_event({**first, **tail}) == (
        b'data: {"content": "E", "prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3, '
        b'"model": "chatglm2-6b-32k", "object": "chat.completion"}\r\n\r\n'
    )
    assert dumps_event({**second, **tail}).startswith(b'data: {"content": "c", "prompt_tokens": 2, ')
    # Raw UTF-8, no \u escapes; a line break inside the text stays escaped inside the JSON.
    assert dumps_event({"content": "你好\n"}) == 'data: {"content": "你好\\n"}\r\n\r\n'.encode()


def test_comments_and_pings() -> None:
    assert comment("error - bad\r\nthing") == b": error - bad thing\r\n\r\n"
    assert PING.match(": " + ping_text())
    assert re.fullmatch(r"ping - \d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}", ping_text())


@pytest.mark.parametrize(
    ("history", "pairs"),
    [
        ([], []),
        ([["q1", "a1"], ["q2", "a2"]], [("q1", "a1"), ("q2", "a2")]),
        ([["q1", "a1", "q2", "a2"]], [("q1", "a1"), ("q2", "a2")]),
        ([["q1", "a1", "q2"]], [("q1", "a1")]),
        ([["only"]], []),
        ([[]], []),
        ([["", "transcript"]], [("", "transcript")]),
    ],
)
def test_history_pairs(history: list[list[str]], pairs: list[tuple[str, str]]) -> None:
    assert history_pairs(history) == pairs


def test_chat_messages_skip_empty_texts() -> None:
    template = ChatTemplate()
    req = GLMChatRequest(prompt="  ", history=[["", "A"], ["Q", " \n "]])
    assert chat_messages(req, template) == [ChatMessage("assistant", "A"), ChatMessage("user", "Q")]


@pytest.mark.parametrize(
    ("loc", "path"),
    [
        (("history", 0, 1), "history[0][1]"),
        (("body", "prompt"), "prompt"),
        (("body",), "body"),
        ((), "body"),
        (("max_length",), "max_length"),
    ],
)
def test_field_path(loc: tuple[int | str, ...], path: str) -> None:
    assert field_path(loc) == path


def test_details_and_statuses() -> None:
    assert detail(InvalidParameter("must be in [0, 1]", param="top_p")) == "top_p: must be in [0, 1]"
    assert detail(InvalidParameter("top_p: already named", param="top_p")) == "top_p: already named"
    assert detail(ServerBusy("the request queue is full (3 waiting)")) == "server busy"
    busy = GLMErrors().gateway_error(ServerBusy(retry_after=2.6))
    assert busy.status_code == 503 and busy.headers["retry-after"] == "3"
    assert busy.body == b'{"detail":"server busy"}'
    loading = GLMErrors().gateway_error(NotReady("the model is still loading"))
    assert loading.status_code == 503 and loading.headers["retry-after"] == "5"


def test_reply_pieces_trim_like_the_whole_reply_and_count_what_was_sent(tokenizer: Tokenizer) -> None:
    pieces = ReplyPieces(tokenizer)
    sent = [pieces.push(t) for t in [" ", " Hello", ",", " world", "\n", "!", "\n\n", " "]]
    assert sent == ["", "Hello", ",", " world", "", "\n!", "", ""]
    assert pieces.text == "Hello, world\n!" == " Hello, world\n!\n\n ".strip()
    assert pieces.completion_tokens == sum(len(tokenizer.encode(p)) for p in sent if p)
