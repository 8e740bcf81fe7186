"""Tokenizers: World ids equal to the rwkv package's, token bytes, unsafe ids, `tokenizers` files, loading."""

from __future__ import annotations

from pathlib import Path

import pytest
from rwkv.rwkv_tokenizer import TRIE_TOKENIZER
from tokenizers import Tokenizer as HFTok
from tokenizers import decoders, models, pre_tokenizers, trainers

from rwkv_gateway.engine.tokenizer import (
    HFTokenizer,
    WorldTokenizer,
    default_world_vocab,
    load_tokenizer,
    unsafe_token_ids,
)
from rwkv_gateway.errors import ConfigError

MIXED = [
    "Hello, world!",
    "你好\uff0c世界\uff01RWKV 是一种 RNN 语言模型。",
    "emoji: 😀🎉👍🏽 👨‍👩‍👧 🦜 \U0001d54f ✅",
    "\n\nUser: hi\n\nAssistant: hello there",
    "def f(x: int) -> int:\n\treturn x ** 2  # square\r\n\n    if x:\n        pass\n",
    "   leading and trailing spaces   \t\t\n\n\n",
    "日本語のテキストと한국어 텍스트, Ελληνικά, русский, العربية",
    "\x00\x01\x7f control bytes",
    "",
    " " * 300 + "#" * 200 + "-" * 90,
]


@pytest.fixture(scope="module")
def world() -> WorldTokenizer:
    return WorldTokenizer()


@pytest.fixture(scope="module")
def reference() -> TRIE_TOKENIZER:
    return TRIE_TOKENIZER(str(default_world_vocab()))


@pytest.mark.parametrize("text", MIXED)
def test_world_matches_rwkv_package_and_round_trips(
    world: WorldTokenizer, reference: TRIE_TOKENIZER, text: str
) -> None:
    ids = world.encode(text)
    assert ids == reference.encode(text)
    assert world.decode(ids) == text


def test_world_matches_rwkv_package_on_long_source(world: WorldTokenizer, reference: TRIE_TOKENIZER) -> None:
    # The package's own source is a convenient long code sample; importing it would start torch.
    text = default_world_vocab().with_name("model.py").read_text(encoding="utf-8") + "".join(MIXED) * 20
    ids = world.encode(text)
    assert ids == reference.encode(text)
    assert world.decode(ids) == text


def test_world_vocabulary_identical_to_rwkv_package(world: WorldTokenizer, reference: TRIE_TOKENIZER) -> None:
    assert len(reference.idx2token) == 65529
    for token_id, raw in reference.idx2token.items():
        assert world.token_bytes(token_id) == raw


def test_world_shape(world: WorldTokenizer) -> None:
    assert world.vocab_size == 65536
    assert world.eos_token_id == 0
    assert world.name == "rwkv_vocab_v20230424"
    assert load_tokenizer(None).encode("abc") == world.encode("abc")


def test_world_token_bytes(world: WorldTokenizer) -> None:
    # Ids 1..256 are the single bytes 0x00..0xFF.
    for b in range(256):
        assert world.token_bytes(b + 1) == bytes([b])
    ids = world.encode("你好😀")
    assert b"".join(world.token_bytes(i) for i in ids) == "你好😀".encode()
    assert any(len(world.token_bytes(i)) > 1 for i in ids)
    assert world.token_bytes(world.encode("😀")[0]) == b"\xf0\x9f"  # a partial character
    for missing in (0, 65530, 65535, 65536, -1, 10**9):
        assert world.token_bytes(missing) == b""


def test_world_decode_never_raises(world: WorldTokenizer) -> None:
    a = world.encode("a")
    assert world.decode([0, -5, *a, 65535, 10**12, -(10**12)]) == "a"
    assert world.decode(world.encode("😀")[:1]) == "\ufffd"
    assert world.decode([]) == ""


def test_world_encode_lone_surrogate(world: WorldTokenizer) -> None:
    assert world.decode(world.encode("a\ud83db")) == "a\ufffdb"
    assert world.decode(world.encode("\ud83d\ude00")) == "😀"


def test_world_unsafe_token_ids(world: WorldTokenizer) -> None:
    unsafe = unsafe_token_ids(world)
    assert unsafe == sorted(set(unsafe))
    assert 0 in unsafe
    assert world.encode("😀")[0] in unsafe
    assert world.encode("a")[0] not in unsafe
    assert world.encode("你")[0] not in unsafe
    assert set(range(65530, 65536)) <= set(unsafe)
    assert set(range(0x80 + 1, 0x100 + 1)) <= set(unsafe)  # lone bytes 0x80..0xFF
    assert not set(range(1, 0x80 + 1)) & set(unsafe)  # ASCII
    unsafe_set = set(unsafe)
    for token_id in range(world.vocab_size):
        if token_id not in unsafe_set:
            world.token_bytes(token_id).decode("utf-8")  # raises if the table is wrong
    assert len(unsafe) == 493


def _write_world_vocab(path: Path, extra: list[bytes | str]) -> None:
    lines = [f"{b + 1} {bytes([b])!r} 1" for b in range(256)]
    for i, token in enumerate(extra, 257):
        size = len(token.encode() if isinstance(token, str) else token)
        lines.append(f"{i} {token!r} {size}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_world_custom_vocab_file(tmp_path: Path) -> None:
    path = tmp_path / "vocab.txt"
    _write_world_vocab(path, ["ab", "abc", "你好", b"\xe4\xbd", 'it\'s \\ "q"'])
    tok = load_tokenizer(path)
    assert isinstance(tok, WorldTokenizer)
    assert tok.encode("abcab你好x") == [258, 257, 259, 121]
    assert tok.token_bytes(260) == b"\xe4\xbd"
    assert tok.encode('it\'s \\ "q"') == [261]
    assert tok.decode(tok.encode("你们 abc")) == "你们 abc"


def test_world_vocab_larger_than_model(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="vocab_size"):
        WorldTokenizer(vocab_size=1000)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"\xff\xfe\x00garbage",
        b"0 'a' 1\n",
        b"99999999999 'a' 1\n",
        b"1 'a' 2\n",
        b"hello world\n",
        b"1 {[]: 1} 1\n",
        b"1 'a 1\n",
    ],
)
def test_world_invalid_vocab_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        load_tokenizer(path)
    assert "\n" not in info.value.message


HF_CORPUS = [
    "hello world, the quick brown fox jumps over the lazy dog",
    "你好 世界 你好世界 😀 😀😀 🎉",
    "def main():\n    return 42\n\n",
] * 40


@pytest.fixture
def hf_path(tmp_path: Path) -> Path:
    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(HF_CORPUS, trainer=trainer)
    path = tmp_path / "tiny_bpe.json"
    tok.save(str(path))
    return path


def test_hf_byte_level_round_trip_and_bytes(hf_path: Path) -> None:
    tok = load_tokenizer(hf_path)
    assert isinstance(tok, HFTokenizer)
    assert tok.name == "tiny_bpe"
    assert tok.eos_token_id == 0
    raw = HFTok.from_file(str(hf_path))
    assert tok.vocab_size == raw.get_vocab_size(with_added_tokens=True)
    for text in [*MIXED, "hello 你好 😀 world"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert b"".join(tok.token_bytes(i) for i in ids) == text.encode()
    # Merged tokens map back from GPT-2's byte alphabet ("Ġä½łå¥½") to their real bytes.
    for text in (" 你好", " 😀"):
        ids = tok.encode(text)
        assert len(ids) == 1
        assert tok.token_bytes(ids[0]) == text.encode()
    # Every token's bytes agree with the library's own decoding of it.
    for token_id in range(tok.vocab_size):
        piece = tok.token_bytes(token_id)
        assert piece.decode("utf-8", "replace") == raw.decode([token_id])


def test_hf_partial_bytes_and_unsafe(hf_path: Path) -> None:
    tok = load_tokenizer(hf_path, vocab_size=400)
    assert tok.vocab_size == 400
    lead = HFTok.from_file(str(hf_path)).token_to_id("ð")  # byte 0xF0 in GPT-2's byte alphabet
    assert tok.token_bytes(lead) == b"\xf0"
    assert tok.token_bytes(0) == b""  # special token: no text
    assert tok.token_bytes(399) == b""
    assert tok.token_bytes(-1) == b""
    unsafe = unsafe_token_ids(tok)
    assert 0 in unsafe
    assert lead in unsafe
    assert 399 in unsafe
    assert tok.encode("a")[0] not in unsafe
    assert tok.decode([lead]) == "\ufffd"
    assert tok.decode([-1, 10**9, 399, *tok.encode("ok")]) == "ok"


def test_hf_lone_surrogate(hf_path: Path) -> None:
    tok = load_tokenizer(hf_path)
    assert tok.decode(tok.encode("a\ud83db")) == "a\ufffdb"


def test_hf_non_byte_level_falls_back_to_decode(tmp_path: Path) -> None:
    tok = HFTok(models.WordLevel({"hello": 0, "world": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "words.json"
    tok.save(str(path))
    loaded = load_tokenizer(path)
    assert loaded.encode("hello world") == [0, 1]
    assert loaded.token_bytes(1) == b"world"
    assert loaded.token_bytes(3) == b""
    assert loaded.eos_token_id is None
    assert loaded.decode([0, 7, -1]) == "hello"


def test_hf_vocab_larger_than_model(hf_path: Path) -> None:
    with pytest.raises(ConfigError, match="vocab_size"):
        load_tokenizer(hf_path, vocab_size=10)


def test_load_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.json"
    with pytest.raises(ConfigError, match="not found") as info:
        load_tokenizer(path)
    assert str(path) in info.value.message


@pytest.mark.parametrize("content", [b"garbage{", b"{}", b"\xff\xfe\x00\x01", b'{"model": 3}'])
def test_load_garbage_json(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        load_tokenizer(path)
    assert "\n" not in info.value.message
    assert str(path) in info.value.message


def test_load_directory_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        load_tokenizer(tmp_path)
