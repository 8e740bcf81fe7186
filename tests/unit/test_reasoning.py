"""Splitting a G-series reply into reasoning and content, at every chunk boundary
(docs/chat-prompts.md#6-reasoning-and-answer)."""

from __future__ import annotations

import itertools

import pytest

from rwkv_gateway.domain.prompts import ThinkMode
from rwkv_gateway.domain.reasoning import ThinkSplitter, split_reply

THOUGHT = ">\nThe user asks who made RWKV.\n\nBo Peng did. </think>\n\nBo Peng made it.\n"


def streamed(chunks: list[str], think: ThinkMode) -> tuple[str, str]:
    splitter = ThinkSplitter(think)
    pieces = [splitter.push(c) for c in chunks] + [splitter.finish()]
    reasoning = "".join(r for r, _ in pieces)
    content = "".join(c for _, c in pieces)
    assert (reasoning, content) == (splitter.reasoning, splitter.content)
    return reasoning, content


@pytest.mark.parametrize(
    ("think", "text", "expected"),
    [
        ("think", THOUGHT, ("The user asks who made RWKV.\n\nBo Peng did.", "Bo Peng made it.")),
        ("long", "> a</think>b", ("a", "b")),
        ("short", "no gt </think> b </think> c", ("no gt", "b </think> c")),
        (
            "think",
            ">\nStill thinking when max_tokens cut it </thi",
            ("Still thinking when max_tokens cut it </thi", ""),
        ),
        ("think", ">", ("", "")),
        ("think", "", ("", "")),
        ("fake", ">\n\nBo Peng made it.", ("", "Bo Peng made it.")),
        ("fake", "Bo Peng > me", ("", "Bo Peng > me")),
        ("off", "> quoted \n", ("", "> quoted")),
        ("off", " a </think> b", ("", "a </think> b")),
    ],
)
def test_whole_reply(think: ThinkMode, text: str, expected: tuple[str, str]) -> None:
    assert split_reply(text, think) == expected
    assert streamed([text], think) == expected


@pytest.mark.parametrize("think", ["think", "fake", "off"])
@pytest.mark.parametrize(
    "text",
    [
        THOUGHT,
        "><</</th</think</think>>x </think> y",  # tag look-alikes on every side of the real tag
        ">\n  reasoning cut inside the tag </think",
    ],
)
def test_every_two_and_three_way_split_gives_the_whole_reply(think: ThinkMode, text: str) -> None:
    expected = split_reply(text, think)
    n = len(text)
    for i in range(n + 1):
        assert streamed([text[:i], text[i:]], think) == expected, i
    for i, j in itertools.combinations_with_replacement(range(n + 1), 2):
        assert streamed([text[:i], text[i:j], text[j:]], think) == expected, (i, j)


def test_character_by_character() -> None:
    assert streamed(list(THOUGHT), "think") == split_reply(THOUGHT, "think")


def test_tag_look_alikes() -> None:
    assert split_reply("><</</th</think</think>>x </think> y", "think") == ("<</</th</think", ">x </think> y")


def test_reasoning_tokens_count_the_chunks_until_the_block_closes() -> None:
    splitter = ThinkSplitter("think")
    splitter.push(">", 1)
    splitter.push("hm", 2)
    splitter.push("</think>", 3)
    splitter.push("answer", 4)
    splitter.finish()
    assert splitter.reasoning_tokens == 6
    fake = ThinkSplitter("fake")
    fake.push(">answer", 2)
    assert fake.reasoning_tokens == 0
