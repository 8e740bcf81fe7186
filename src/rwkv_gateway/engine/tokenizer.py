"""Tokenizers for the served model: the RWKV World vocabulary and `tokenizers` JSON files (Pile models).

Both expose the same small `Tokenizer` interface, including the raw bytes of each token so that the
streaming decoder can join tokens that split a UTF-8 character. `WorldTokenizer` reproduces the `rwkv`
package's TRIE_TOKENIZER exactly (greedy longest match over bytes) with a lighter trie that loads and
encodes faster; its parsed vocabulary is cached per file.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import gc
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

import tokenizers
import tokenizers.decoders

from rwkv_gateway.errors import ConfigError

#: File name of the World vocabulary shipped inside the `rwkv` package.
WORLD_VOCAB_NAME = "rwkv_vocab_v20230424.txt"
#: Embedding-table size of every World model (ids 65530..65535 have no token).
WORLD_VOCAB_SIZE = 65536
#: Names tried, in order, for the end-of-text token of a `tokenizers` file.
_HF_EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>")


class Tokenizer(Protocol):
    """What the engine needs from a tokenizer."""

    name: str
    #: Size of the model's embedding table this tokenizer targets (65536 for World).
    vocab_size: int
    #: The "end of text" token (0 for World), or None when the vocabulary has none.
    eos_token_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; invalid UTF-8 becomes U+FFFD and unknown ids are skipped. Never raises."""
        ...

    def token_bytes(self, token_id: int) -> bytes:
        """Raw bytes of one token; b"" for ids with none (World's 0, unused or out-of-range ids)."""
        ...


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        # Lone surrogates (legal in JSON strings) cannot be UTF-8 encoded; a prompt should not fail on
        # them, so pair what pairs and turn the rest into U+FFFD.
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace").encode("utf-8")


def _scrub(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return _utf8(text).decode("utf-8")
    return text


def _one_line(exc: BaseException) -> str:
    return re.sub(r"\s+", " ", str(exc)).strip() or type(exc).__name__


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    # Building the vocabulary allocates ~200k small objects that all stay alive; with the cyclic
    # collector running, its repeated full passes over them cost several times the build itself.
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


# A trie node is [children, token id]: children maps the next byte to a node, and is the shared
# _LEAF dict (never written) until the node gets a child; token id is -1 where no token ends.
_Node = list[Any]
_LEAF: dict[int, _Node] = {}


@dataclass(frozen=True, slots=True)
class _WorldVocab:
    id_to_bytes: tuple[bytes, ...]
    #: The 256 first-byte nodes of the trie, indexed by byte value.
    first: tuple[_Node, ...]


def default_world_vocab() -> Path:
    """Path of the World vocabulary inside the installed `rwkv` package."""
    return Path(str(resources.files("rwkv").joinpath(WORLD_VOCAB_NAME)))


def _parse_token(literal: str, size: int) -> bytes:
    """Bytes of one vocabulary entry, a Python str or bytes literal as repr() writes it."""
    raw: object = None
    # ast.literal_eval per line is most of the load time; repr()'s quoting decodes exactly with the
    # escape codecs (non-Latin-1 characters go through as \u escapes). The declared length catches
    # anything unusual, which then gets the full parser.
    quote = literal[-1:]
    try:
        if len(literal) >= 3 and literal[0] == "b" and literal[1] == quote and quote in "'\"":
            raw = literal[2:-1].encode("latin-1").decode("unicode_escape").encode("latin-1")
        elif len(literal) >= 2 and literal[0] == quote and quote in "'\"":
            raw = literal[1:-1].encode("latin-1", "backslashreplace").decode("unicode_escape").encode("utf-8")
    except UnicodeError:
        pass
    if not isinstance(raw, bytes) or len(raw) != size:
        value = ast.literal_eval(literal)
        raw = value.encode("utf-8") if isinstance(value, str) else value
    if not isinstance(raw, bytes) or not raw or len(raw) != size:
        raise ValueError("token length does not match")
    return raw


@functools.lru_cache(maxsize=4)
def _load_world_vocab(path: Path) -> _WorldVocab:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read World vocabulary {path}: {_one_line(exc)}") from exc
    token_to_id: dict[bytes, int] = {}
    with _gc_paused():
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            # Format: `<id> <python str or bytes literal> <byte length>`, as the rwkv package reads it.
            try:
                token_id = int(line[: line.index(" ")])
                size = int(line[line.rindex(" ") :])
                raw = _parse_token(line[line.index(" ") : line.rindex(" ")].strip(), size)
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError) as exc:
                raise ConfigError(f"invalid World vocabulary {path} line {lineno}: {_one_line(exc)}") from exc
            if not 1 <= token_id < 1 << 24:
                raise ConfigError(f"invalid World vocabulary {path} line {lineno}: bad id {token_id}")
            token_to_id[raw] = token_id

        single = [token_to_id.get(bytes([b])) for b in range(256)]
        if None in single:
            # Greedy matching falls back to single bytes; without all 256 some text has no encoding.
            raise ConfigError(f"invalid World vocabulary {path}: it lacks single-byte tokens")
        table = [b""] * (max(token_to_id.values()) + 1)
        first: list[_Node] = [[_LEAF, tid] for tid in single]
        for raw, token_id in token_to_id.items():
            table[token_id] = raw
            node = first[raw[0]]
            for byte in raw[1:]:
                children = node[0]
                if children is _LEAF:
                    children = node[0] = {}
                child = children.get(byte)
                if child is None:
                    child = children[byte] = [_LEAF, -1]
                node = child
            node[1] = token_id
    return _WorldVocab(id_to_bytes=tuple(table), first=tuple(first))


class WorldTokenizer:
    """The RWKV World vocabulary: greedy longest match over UTF-8 bytes, identical to TRIE_TOKENIZER."""

    def __init__(self, path: Path | None = None, vocab_size: int | None = None) -> None:
        vocab_path = (path or default_world_vocab()).resolve()
        self._vocab = _load_world_vocab(vocab_path)
        self._id_to_bytes = self._vocab.id_to_bytes
        self.name = vocab_path.stem
        self.vocab_size = WORLD_VOCAB_SIZE if vocab_size is None else vocab_size
        if len(self._id_to_bytes) > self.vocab_size:
            raise ConfigError(
                f"World vocabulary {vocab_path} has ids up to {len(self._id_to_bytes) - 1}, "
                f"more than the model's vocab_size {self.vocab_size}"
            )
        self.eos_token_id: int | None = 0

    def encode(self, text: str) -> list[int]:
        src = _utf8(text)
        first = self._vocab.first
        out: list[int] = []
        append = out.append
        pos = 0
        end = len(src)
        while pos < end:
            # Walk the trie as far as the text allows, remembering the last node where a token ends;
            # the first byte always ends a token, so every step makes progress.
            node = first[src[pos]]
            pos += 1
            best = node[1]
            best_end = pos
            children = node[0]
            i = pos
            while children and i < end:
                node = children.get(src[i])
                if node is None:
                    break
                i += 1
                if node[1] >= 0:
                    best = node[1]
                    best_end = i
                children = node[0]
            append(best)
            pos = best_end
        return out

    def decode(self, ids: Sequence[int]) -> str:
        table = self._id_to_bytes
        size = len(table)
        return b"".join([table[i] for i in ids if 0 <= i < size]).decode("utf-8", "replace")

    def token_bytes(self, token_id: int) -> bytes:
        if 0 <= token_id < len(self._id_to_bytes):
            return self._id_to_bytes[token_id]
        return b""


@functools.cache
def _unicode_to_byte() -> dict[str, int]:
    # GPT-2's bytes_to_unicode table, inverted: byte-level BPE spells byte b as chr(b) when printable
    # and otherwise as chr(256 + n) for the n-th unprintable byte.
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {chr(b): b for b in printable}
    n = 0
    for b in range(256):
        if b not in printable:
            mapping[chr(256 + n)] = b
            n += 1
    return mapping


class HFTokenizer:
    """A `tokenizers` JSON file, e.g. 20B_tokenizer.json of the Pile-vocabulary RWKV models."""

    def __init__(self, path: Path, vocab_size: int | None = None) -> None:
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as exc:  # the Rust side raises a bare Exception for every failure
            raise ConfigError(f"cannot load tokenizer file {path}: {_one_line(exc)}") from exc
        self.name = path.stem
        self._size = int(self._tok.get_vocab_size(with_added_tokens=True))
        self.vocab_size = self._size if vocab_size is None else vocab_size
        if self._size > self.vocab_size:
            raise ConfigError(
                f"tokenizer {path} has {self._size} tokens, "
                f"more than the model's vocab_size {self.vocab_size}"
            )
        self.eos_token_id: int | None = None
        for eos in _HF_EOS_NAMES:
            eos_id = self._tok.token_to_id(eos)
            if eos_id is not None:
                self.eos_token_id = int(eos_id)
                break
        self._table: list[bytes] | None = None
        if isinstance(self._tok.decoder, tokenizers.decoders.ByteLevel):
            self._table = self._byte_level_table()

    def _byte_level_table(self) -> list[bytes]:
        # Mirrors the ByteLevel decoder: a token whose characters all map back to bytes is those bytes,
        # any other (an added token) is its own UTF-8; special tokens decode to nothing.
        to_byte = _unicode_to_byte()
        special = {int(i) for i, added in self._tok.get_added_tokens_decoder().items() if added.special}
        table = [b""] * self._size
        for piece, token_id in self._tok.get_vocab(with_added_tokens=True).items():
            if token_id in special or not 0 <= token_id < self._size:
                continue
            try:
                table[token_id] = bytes([to_byte[c] for c in piece])
            except KeyError:
                table[token_id] = piece.encode("utf-8")
        return table

    def encode(self, text: str) -> list[int]:
        # The gateway builds prompts itself, so no post-processor tokens are added around the text.
        return list(self._tok.encode(_scrub(text), add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        if self._table is not None:
            table = self._table
            return b"".join([table[i] for i in ids if 0 <= i < self._size]).decode("utf-8", "replace")
        return str(self._tok.decode([i for i in ids if 0 <= i < self._size]))

    def token_bytes(self, token_id: int) -> bytes:
        if not 0 <= token_id < self._size:
            return b""
        if self._table is not None:
            return self._table[token_id]
        # Other decoders have no byte view of a token; its decoded text is the best available.
        return str(self._tok.decode([token_id])).encode("utf-8")


def load_tokenizer(path: Path | None, vocab_size: int | None = None) -> Tokenizer:
    """The World tokenizer for None, a World-format vocabulary for a `.txt` file, else a `tokenizers` JSON.

    Raises ConfigError with a one-line message for a missing or unreadable file.
    """
    if path is None:
        return WorldTokenizer(vocab_size=vocab_size)
    if not path.is_file():
        raise ConfigError(f"tokenizer file not found: {path}")
    if path.suffix == ".txt":
        return WorldTokenizer(path, vocab_size=vocab_size)
    return HFTokenizer(path, vocab_size=vocab_size)


def unsafe_token_ids(tok: Tokenizer) -> list[int]:
    """Ids in range(vocab_size) that cannot be shown on their own: no bytes, or not valid UTF-8 alone.

    Useful for masking tokens out of sampling where text must come out token by token.
    """
    unsafe: list[int] = []
    for token_id in range(tok.vocab_size):
        raw = tok.token_bytes(token_id)
        if not raw:
            unsafe.append(token_id)
            continue
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            unsafe.append(token_id)
    return unsafe
