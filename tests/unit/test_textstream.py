"""Streaming text: whole characters from token ids, and stop strings that never leak."""

from __future__ import annotations

import random

import pytest

from rwkv_gateway.engine.textstream import IncrementalDecoder, StopMatcher
from rwkv_gateway.engine.tokenizer import WorldTokenizer


@pytest.fixture(scope="module")
def world() -> WorldTokenizer:
    return WorldTokenizer()


def byte_ids(data: bytes) -> list[int]:
    """World ids 1..256 are the single bytes 0x00..0xFF."""
    return [b + 1 for b in data]


# The parrot and the double-struck X (U+1D54F) are spelled over several World tokens, some of them
# partial characters.
TEXT = "你好\uff0c世界\uff01RWKV 很快。😀🎉👍🏽 🦜 \U0001d54f 👨‍👩‍👧 日本語 Ελληνικά\n\nUser: ok"


def test_world_tokens_one_by_one_are_whole_characters(world: WorldTokenizer) -> None:
    ids = world.encode(TEXT)
    decoder = IncrementalDecoder(world)
    pieces = [decoder.push(i) for i in ids]
    pieces.append(decoder.flush())
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) == TEXT
    assert "" in pieces[:-1]  # some token really ended mid-character


def test_emoji_from_single_bytes_waits_until_complete(world: WorldTokenizer) -> None:
    decoder = IncrementalDecoder(world)
    ids = byte_ids("😀".encode())
    assert len(ids) == 4
    assert [decoder.push(i) for i in ids] == ["", "", "", "😀"]
    assert decoder.flush() == ""


def test_stray_continuation_byte_is_replaced_not_stalled(world: WorldTokenizer) -> None:
    decoder = IncrementalDecoder(world)
    assert decoder.push(byte_ids(b"\x80")[0]) == "\ufffd"
    assert decoder.push(byte_ids(b"a")[0]) == "a"


def test_interrupted_character_is_replaced(world: WorldTokenizer) -> None:
    decoder = IncrementalDecoder(world)
    first, second, ascii_a = byte_ids(b"\xf0\x9fa")
    assert decoder.push(first) == ""
    assert decoder.push(second) == ""
    assert decoder.push(ascii_a) == "\ufffda"


def test_flush_replaces_incomplete_tail(world: WorldTokenizer) -> None:
    decoder = IncrementalDecoder(world)
    assert decoder.push(world.encode("x😀")[0]) == "x"
    assert decoder.push(byte_ids(b"\xe4")[0]) == ""
    assert decoder.flush() == "\ufffd"
    assert decoder.flush() == ""


def test_tokens_without_bytes_yield_nothing(world: WorldTokenizer) -> None:
    decoder = IncrementalDecoder(world)
    assert decoder.push(0) == ""
    assert decoder.push(65535) == ""
    assert decoder.push(-3) == ""
    assert decoder.flush() == ""


def feed(matcher: StopMatcher, chunks: list[str]) -> tuple[str, str | None]:
    out = []
    for chunk in chunks:
        text, stop = matcher.push(chunk)
        out.append(text)
        if stop is not None:
            return "".join(out), stop
    out.append(matcher.flush())
    return "".join(out), None


def test_no_stops_is_passthrough() -> None:
    for stops in ([], [""]):
        matcher = StopMatcher(stops)
        assert matcher.push("abc") == ("abc", None)
        assert matcher.push("") == ("", None)
        assert matcher.flush() == ""


def test_match_within_one_push() -> None:
    matcher = StopMatcher(["\nUser:"])
    assert matcher.push("hello\nUser: more") == ("hello", "\nUser:")
    assert matcher.finished
    assert matcher.matched == "\nUser:"
    assert matcher.push("anything") == ("", None)
    assert matcher.flush() == ""


def test_stop_split_across_pushes() -> None:
    matcher = StopMatcher(["\n\nUser:"])
    assert matcher.push("Hi\n") == ("Hi", None)
    assert matcher.push("\nUs") == ("", None)
    assert matcher.push("e") == ("", None)
    assert matcher.push("r: yo") == ("", "\n\nUser:")


def test_stop_fed_one_character_at_a_time() -> None:
    text = "The answer is 42.\n\nUser: next question"
    assert feed(StopMatcher(["\n\nUser:"]), list(text)) == ("The answer is 42.", "\n\nUser:")


def test_false_start_is_released() -> None:
    matcher = StopMatcher(["abc"])
    assert matcher.push("xab") == ("x", None)
    assert matcher.push("x") == ("abx", None)
    assert matcher.flush() == ""


def test_holds_back_only_longest_prefix_suffix() -> None:
    matcher = StopMatcher(["aab"])
    assert matcher.push("aaa") == ("a", None)
    assert matcher.push("b") == ("", "aab")


def test_held_back_prefix_released_on_flush() -> None:
    matcher = StopMatcher(["END"])
    assert matcher.push("the EN") == ("the ", None)
    assert matcher.flush() == "EN"
    assert matcher.finished
    assert matcher.matched is None


def test_earliest_match_wins() -> None:
    assert feed(StopMatcher(["world", "lo w"]), ["hello world"]) == ("hel", "lo w")
    assert feed(StopMatcher(["world", "lo w"]), ["hel", "l", "o wor", "ld"]) == ("hel", "lo w")
    assert feed(StopMatcher(["zzz", "b"]), ["aaa", "zz", "b"]) == ("aaazz", "b")


def test_overlapping_stops() -> None:
    # Both complete in the same push: the earlier start wins, the shorter on a tie.
    assert feed(StopMatcher(["abcd", "bc"]), ["xabcd"]) == ("x", "abcd")
    assert feed(StopMatcher(["abc", "ab"]), ["xabc"]) == ("x", "ab")
    # Overlapping across pushes: "xyz" starts first.
    assert feed(StopMatcher(["yz!", "xyz"]), ["xy", "z!"]) == ("", "xyz")
    # A stop complete now is not held for a longer one that might still finish.
    assert feed(StopMatcher(["abcd", "bc"]), ["ab", "c", "d"]) == ("a", "bc")


def test_duplicate_and_unicode_stops() -> None:
    assert feed(StopMatcher(["。", "。", ""]), ["你好", "。再见"]) == ("你好", "。")
    assert feed(StopMatcher(["😀!"]), ["a😀", "?😀", "!"]) == ("a😀?", "😀!")


def test_random_chunkings_agree_with_earliest_find() -> None:
    rng = random.Random(1234)
    for _ in range(400):
        text = "".join(rng.choice("ab\n") for _ in range(rng.randint(0, 40)))
        stops = [
            "".join(rng.choice("ab\n") for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 3))
        ]
        # Without one stop inside another, where a stop completes does not depend on the chunking.
        stops = [s for s in stops if not any(s != t and s in t for t in stops)]
        finds = [(text.find(s), len(s), s) for s in stops if s in text]
        expected: tuple[str, str | None] = (text, None)
        if finds:
            at, _, stop = min(finds)
            expected = (text[:at], stop)
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(0, 6))))
        chunks = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        assert feed(StopMatcher(stops), chunks) == expected, (text, stops, chunks)
