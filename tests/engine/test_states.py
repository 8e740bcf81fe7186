"""Tests of the state store: file format round trips, corruption handling, LRU budget, key safety."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from rwkv_gateway.engine.snapshot import StateSnapshot
from rwkv_gateway.engine.states import MAGIC, ORPHAN_TMP_AGE_S, StateStore, load_snapshot, save_snapshot
from rwkv_gateway.errors import StateMismatch

MODEL = "model-a"


def live_state(seed: int, n_embd: int = 8, heads: int = 2, head_size: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(n_embd, generator=g).to(torch.bfloat16),
        torch.randn(heads, head_size, head_size, generator=g),
        torch.randn(n_embd, generator=g).to(torch.float16),
        torch.randn(heads, head_size, head_size, generator=g),
    ]


def snap(
    seed: int = 0,
    *,
    model_id: str = MODEL,
    token_count: int = 5,
    n_embd: int = 8,
    logits: torch.Tensor | None = None,
) -> StateSnapshot:
    return StateSnapshot.capture(
        live_state(seed, n_embd=n_embd),
        model_id=model_id,
        version="7",
        token_count=token_count,
        logits=logits,
    )


def assert_same(a: StateSnapshot, b: StateSnapshot) -> None:
    assert torch.equal(a.flat, b.flat)
    assert a.flat.dtype == b.flat.dtype == torch.float32
    assert a.layout == b.layout
    assert (a.model_id, a.version, a.token_count) == (b.model_id, b.version, b.token_count)
    if a.logits is None or b.logits is None:
        assert a.logits is None
        assert b.logits is None
    else:
        assert b.logits.dtype == torch.float32
        assert torch.equal(a.logits, b.logits)


def state_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file())


def store_path(store: StateStore, key: str) -> Path:
    digest = hashlib.sha256(key.encode()).hexdigest()
    return store.directory / digest[:2] / f"{digest}.state"


# -- file format ------------------------------------------------------------------------------------


def test_round_trip_is_exact_and_restores_mixed_dtypes(tmp_path: Path) -> None:
    original = live_state(1)
    s = StateSnapshot.capture(original, model_id=MODEL, version="7", token_count=42)
    before = s.flat.clone()
    path = tmp_path / "one.state"
    save_snapshot(path, s)
    loaded = load_snapshot(path, model_id=MODEL, device=torch.device("cpu"))
    assert_same(s, loaded)
    assert torch.equal(s.flat, before)  # saving never touches the source buffer
    restored = loaded.restore()
    assert [t.dtype for t in restored] == [torch.bfloat16, torch.float32, torch.float16, torch.float32]
    for got, want in zip(restored, original, strict=True):
        assert got.shape == want.shape
        assert torch.equal(got, want)


@pytest.mark.parametrize("vocab", [0, 1, 65536])
def test_round_trip_keeps_logits(tmp_path: Path, vocab: int) -> None:
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(vocab))
    s = snap(1, logits=logits)
    path = tmp_path / "one.state"
    save_snapshot(path, s)
    loaded = load_snapshot(path)
    assert_same(s, loaded)
    assert loaded.nbytes == s.nbytes


def test_loaded_buffer_is_writable_and_owned(tmp_path: Path) -> None:
    path = tmp_path / "one.state"
    save_snapshot(path, snap(2))
    a = load_snapshot(path)
    b = load_snapshot(path)
    a.flat.add_(1.0)  # would warn (an error here) on a read-only buffer
    assert not torch.equal(a.flat, b.flat)
    path_l = tmp_path / "logits.state"
    save_snapshot(path_l, snap(2, logits=torch.ones(4)))
    c = load_snapshot(path_l)
    assert c.logits is not None
    c.logits.add_(1.0)
    assert torch.equal(c.flat, b.flat)  # the logits do not alias the state buffer


def test_file_layout_matches_the_documented_format(tmp_path: Path) -> None:
    s = snap(3, token_count=9)
    path = tmp_path / "one.state"
    save_snapshot(path, s, key="conv:1")
    data = path.read_bytes()
    assert data[:8] == MAGIC
    (header_len,) = struct.unpack_from("<I", data, 8)
    header = json.loads(data[12 : 12 + header_len].decode("utf-8"))
    payload = data[12 + header_len :]
    assert header["format"] == 1
    assert header["key"] == "conv:1"
    assert header["model_id"] == MODEL
    assert header["version"] == "7"
    assert header["token_count"] == 9
    assert header["dtype"] == "float32"
    assert header["numel"] == s.flat.numel()
    assert header["logits_numel"] is None
    assert header["layout"] == s.layout.to_json()
    assert header["sha256"] == hashlib.sha256(payload).hexdigest()
    assert payload == s.flat.numpy().astype("<f4").tobytes()


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "one.state"
    save_snapshot(path, snap(1))
    save_snapshot(path, snap(2))  # overwrite goes through a temp file + rename too
    assert [p.name for p in tmp_path.iterdir()] == ["one.state"]
    assert_same(load_snapshot(path), snap(2))


def test_wrong_model_id_is_refused_naming_both(tmp_path: Path) -> None:
    path = tmp_path / "one.state"
    save_snapshot(path, snap(1, model_id="model-a"))
    with pytest.raises(StateMismatch, match=r"model-a.*model-b"):
        load_snapshot(path, model_id="model-b")
    assert load_snapshot(path).model_id == "model-a"  # no model_id: no check


def test_wrong_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "one.state"
    save_snapshot(path, snap(1), key="a")
    with pytest.raises(StateMismatch):
        load_snapshot(path, key="b")


def _truncate_payload(data: bytes) -> bytes:
    return data[:-3]


def _truncate_header(data: bytes) -> bytes:
    return data[:20]


def _flip_payload_byte(data: bytes) -> bytes:
    out = bytearray(data)
    out[-5] ^= 0x01
    return bytes(out)


def _bad_magic(data: bytes) -> bytes:
    return b"RWKVGWS9" + data[8:]


def _huge_header_length(data: bytes) -> bytes:
    return data[:8] + struct.pack("<I", 0xFFFFFFF0) + data[12:]


def _garbage_header(data: bytes) -> bytes:
    header_len: int = struct.unpack_from("<I", data, 8)[0]
    return data[:12] + b"\xff" * header_len + data[12 + header_len :]


def _header_lies_about_numel(data: bytes) -> bytes:
    (header_len,) = struct.unpack_from("<I", data, 8)
    header = json.loads(data[12 : 12 + header_len])
    header["numel"] += 1
    raw = json.dumps(header).encode()
    return data[:8] + struct.pack("<I", len(raw)) + raw + data[12 + header_len :]


def _header_lies_about_logits(data: bytes) -> bytes:
    (header_len,) = struct.unpack_from("<I", data, 8)
    header = json.loads(data[12 : 12 + header_len])
    header["logits_numel"] = 2
    raw = json.dumps(header).encode()
    return data[:8] + struct.pack("<I", len(raw)) + raw + data[12 + header_len :]


def _header_not_an_object(data: bytes) -> bytes:
    raw = b"[1, 2, 3]"
    return data[:8] + struct.pack("<I", len(raw)) + raw


@pytest.mark.parametrize(
    "damage",
    [
        _truncate_payload,
        _truncate_header,
        _flip_payload_byte,
        _bad_magic,
        _huge_header_length,
        _garbage_header,
        _header_lies_about_numel,
        _header_lies_about_logits,
        _header_not_an_object,
        lambda data: b"",
        lambda data: data + b"\0\0\0\0",
    ],
    ids=[
        "truncated-payload",
        "truncated-header",
        "flipped-payload-byte",
        "bad-magic",
        "huge-header-length",
        "garbage-header",
        "numel-mismatch",
        "logits-numel-mismatch",
        "header-not-object",
        "empty",
        "appended-bytes",
    ],
)
def test_corrupt_files_raise_state_mismatch(tmp_path: Path, damage: Callable[[bytes], bytes]) -> None:
    store = StateStore(tmp_path / "states", budget_bytes=1 << 20, model_id=MODEL)
    store.put("k", snap(1), persist=True)
    path = store_path(store, "k")
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(StateMismatch, match="corrupt"):
        load_snapshot(path)
    store.clear_ram()
    with pytest.raises(StateMismatch, match="corrupt"):
        store.get("k")


# -- store ------------------------------------------------------------------------------------------


def test_init_creates_directory_and_removes_leftover_temp_files(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "a" / "states"
    StateStore(directory, budget_bytes=0, model_id=MODEL)
    assert directory.is_dir()
    (directory / ".x.state.123.tmp").write_bytes(b"partial")
    (directory / "ab").mkdir()
    (directory / "ab" / ".ab00.state.456.tmp").write_bytes(b"partial")
    (directory / "ab" / "keep.state").write_bytes(b"keep")
    with caplog.at_level(logging.INFO, logger="rwkv_gateway.engine.states"):
        StateStore(directory, budget_bytes=0, model_id=MODEL)
    assert [p.name for p in state_files(directory)] == ["keep.state"]
    assert any(r.getMessage().startswith("removed 2 leftover temp files") for r in caplog.records)


def test_start_up_clean_up_spares_other_replicas_writes(tmp_path: Path) -> None:
    """Replicas share the state directory: only temp files no live writer can own are removed."""
    directory = tmp_path / "states"
    directory.mkdir()
    host = socket.gethostname().replace(".", "_")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        names = {
            "live": f".a.state.{host}@{sleeper.pid}.k1.tmp",  # another replica on this host, writing
            "other-host": f".b.state.elsewhere@{os.getpid()}.k2.tmp",  # another machine, writing
            "dead": f".c.state.{host}@{dead.pid}.k3.tmp",  # this host, its writer is gone
            "own-pid": f".d.state.{host}@{os.getpid()}.k4.tmp",  # a previous life of this pid
            "old": ".e.state.elsewhere@1.k5.tmp",  # anyone's, past the orphan age
        }
        for name in names.values():
            (directory / name).write_bytes(b"partial")
        past = time.time() - ORPHAN_TMP_AGE_S - 60
        os.utime(directory / names["old"], (past, past))
        StateStore(directory, budget_bytes=0, model_id=MODEL)
        left = {p.name for p in directory.iterdir()}
        assert left == {names["live"], names["other-host"]}
    finally:
        sleeper.kill()
        sleeper.wait()


def test_lru_evicts_least_recently_used_by_bytes(tmp_path: Path) -> None:
    size = snap(0).nbytes
    store = StateStore(tmp_path, budget_bytes=2 * size, model_id=MODEL)
    store.put("a", snap(1))
    store.put("b", snap(2))
    assert store.get("a") is not None  # a becomes most recent; b is now the eviction candidate
    store.put("c", snap(3))
    assert "b" not in store
    assert "a" in store
    assert "c" in store
    assert store.get("b") is None
    assert store.stats() == {
        "hits": 1,
        "misses": 1,
        "ram_bytes": 2 * size,
        "ram_entries": 2,
        "disk_writes": 0,
        "disk_reads": 0,
        "evictions": 1,
    }
    # One entry twice the size (extra bytes as logits) pushes out both smaller ones.
    big = snap(4, logits=torch.zeros(size // 4))
    assert big.nbytes == 2 * size
    store.put("big", big)
    stats = store.stats()
    assert stats["ram_entries"] == 1
    assert stats["ram_bytes"] == big.nbytes
    assert stats["evictions"] == 3
    assert "a" not in store
    assert "c" not in store


def test_put_same_key_replaces_and_accounts_bytes_once(tmp_path: Path) -> None:
    store = StateStore(tmp_path, budget_bytes=1 << 20, model_id=MODEL)
    store.put("k", snap(1))
    store.put("k", snap(2))
    got = store.get("k")
    assert got is not None
    assert_same(got, snap(2))
    assert store.stats()["ram_bytes"] == snap(2).nbytes
    assert store.stats()["ram_entries"] == 1


def test_persisted_entry_reloads_after_clear_ram_and_restart(tmp_path: Path) -> None:
    directory = tmp_path / "states"
    store = StateStore(directory, budget_bytes=1 << 20, model_id=MODEL)
    s = snap(5, token_count=77, logits=torch.randn(10))
    store.put("conv/1", s, persist=True)
    assert store.stats()["disk_writes"] == 1
    assert state_files(directory) == [store_path(store, "conv/1")]

    store.clear_ram()
    assert store.stats()["ram_entries"] == 0
    assert "conv/1" in store
    got = store.get("conv/1")
    assert got is not None
    assert_same(got, s)
    assert store.stats()["disk_reads"] == 1
    assert store.stats()["ram_entries"] == 1  # loaded entries join the LRU
    assert store.get("conv/1") is got
    assert store.stats()["disk_reads"] == 1

    restarted = StateStore(directory, budget_bytes=1 << 20, model_id=MODEL)
    again = restarted.get("conv/1")
    assert again is not None
    assert_same(again, s)
    assert restarted.stats()["disk_reads"] == 1


def test_persisted_entry_survives_eviction(tmp_path: Path) -> None:
    size = snap(0).nbytes
    store = StateStore(tmp_path, budget_bytes=size, model_id=MODEL)
    store.put("kept", snap(1), persist=True)
    store.put("other", snap(2))
    assert store.stats()["evictions"] == 1
    got = store.get("kept")
    assert got is not None
    assert_same(got, snap(1))


def test_non_persisted_entry_is_gone_after_eviction(tmp_path: Path) -> None:
    size = snap(0).nbytes
    store = StateStore(tmp_path, budget_bytes=size, model_id=MODEL)
    store.put("cached", snap(1))
    store.put("other", snap(2))
    assert "cached" not in store
    assert store.get("cached") is None
    assert store.stats()["misses"] == 1
    assert state_files(tmp_path) == []


def test_non_persisted_put_supersedes_an_older_file(tmp_path: Path) -> None:
    size = snap(0).nbytes
    store = StateStore(tmp_path, budget_bytes=size, model_id=MODEL)
    store.put("k", snap(1), persist=True)
    store.put("k", snap(2))
    assert state_files(tmp_path) == []
    store.put("other", snap(3))  # evicts k; the stale persisted value must not come back
    assert store.get("k") is None


def test_store_refuses_snapshot_of_another_model(tmp_path: Path) -> None:
    store = StateStore(tmp_path, budget_bytes=1 << 20, model_id=MODEL)
    with pytest.raises(StateMismatch, match=r"model-b.*model-a"):
        store.put("k", snap(1, model_id="model-b"))
    assert "k" not in store


def test_store_get_of_file_from_another_model_raises(tmp_path: Path) -> None:
    old = StateStore(tmp_path, budget_bytes=1 << 20, model_id="model-old")
    old.put("k", snap(1, model_id="model-old"), persist=True)
    new = StateStore(tmp_path, budget_bytes=1 << 20, model_id="model-new")
    with pytest.raises(StateMismatch, match=r"model-old.*model-new"):
        new.get("k")


def test_file_moved_to_another_keys_name_is_refused(tmp_path: Path) -> None:
    store = StateStore(tmp_path, budget_bytes=0, model_id=MODEL)
    store.put("a", snap(1), persist=True)
    target = store_path(store, "b")
    target.parent.mkdir(parents=True, exist_ok=True)
    store_path(store, "a").rename(target)
    with pytest.raises(StateMismatch):
        store.get("b")


HOSTILE_KEYS = [
    "../escape",
    "../../../../../../tmp/escape",
    "/etc/passwd",
    "a/b/c",
    "..",
    ".",
    "",
    "C:\\Windows\\x",
    "..\\..\\x",
    "ключ/../🙂",
    "e\u0301\u200b\ufeff",
    "tab\tnew\nline",
    "x" * 5000,
]


def test_hostile_keys_never_become_paths(tmp_path: Path) -> None:
    directory = tmp_path / "states"
    store = StateStore(directory, budget_bytes=0, model_id=MODEL)
    for i, key in enumerate(HOSTILE_KEYS):
        store.put(key, snap(i, token_count=i), persist=True)
    assert [p.name for p in tmp_path.iterdir()] == ["states"]
    files = state_files(directory)
    assert len(files) == len(HOSTILE_KEYS)
    for f in files:
        assert f.parent.parent == directory
        assert f.suffix == ".state"
        assert len(f.stem) == 64
        assert all(c in "0123456789abcdef" for c in f.stem)
        assert f.parent.name == f.stem[:2]
    for i, key in enumerate(HOSTILE_KEYS):
        got = store.get(key)
        assert got is not None
        assert got.token_count == i
        assert_same(got, snap(i, token_count=i))


def test_delete_removes_ram_and_file_and_tolerates_missing(tmp_path: Path) -> None:
    store = StateStore(tmp_path, budget_bytes=1 << 20, model_id=MODEL)
    store.put("p", snap(1), persist=True)
    store.put("r", snap(2))
    store.delete("p")
    store.delete("r")
    store.delete("never-existed")
    assert "p" not in store
    assert "r" not in store
    assert store.get("p") is None
    assert store.get("r") is None
    assert state_files(tmp_path) == []
    assert store.stats()["ram_bytes"] == 0


def test_snapshot_larger_than_budget_skips_ram(tmp_path: Path) -> None:
    small = snap(1)
    store = StateStore(tmp_path, budget_bytes=small.nbytes, model_id=MODEL)
    store.put("k", small)
    big = snap(2, n_embd=64)
    assert big.nbytes > small.nbytes
    store.put("k", big, persist=True)  # replaces the cached small value, kept on disk only
    assert store.stats()["ram_entries"] == 0
    assert store.stats()["ram_bytes"] == 0
    assert store.stats()["evictions"] == 0
    got = store.get("k")
    assert got is not None
    assert_same(got, big)
    assert store.stats()["ram_entries"] == 0
    store.put("cache-only", big)
    assert store.get("cache-only") is None


def test_zero_budget_caches_nothing(tmp_path: Path) -> None:
    store = StateStore(tmp_path, budget_bytes=0, model_id=MODEL)
    store.put("a", snap(1))
    store.put("b", snap(2), persist=True)
    assert store.get("a") is None
    assert store.get("b") is not None
    assert store.get("b") is not None
    stats = store.stats()
    assert stats["ram_entries"] == 0
    assert stats["disk_reads"] == 2


def test_negative_budget_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        StateStore(tmp_path, budget_bytes=-1, model_id=MODEL)


def test_concurrent_put_get_from_eight_threads(tmp_path: Path) -> None:
    snaps = [snap(i) for i in range(6)]
    size = snaps[0].nbytes
    store = StateStore(tmp_path, budget_bytes=4 * size, model_id=MODEL)
    rounds = 60
    errors: list[BaseException] = []
    gets = [0] * 8
    barrier = threading.Barrier(8)

    def worker(n: int) -> None:
        try:
            barrier.wait()
            for i in range(rounds):
                key = f"shared-{i % 5}" if i % 2 else f"own-{n}-{i % 3}"
                s = snaps[(n + i) % len(snaps)]
                store.put(key, s, persist=i % 4 == 1)
                got = store.get(key)
                gets[n] += 1
                if got is not None:
                    assert got.layout == s.layout
                    assert got.flat.numel() == s.flat.numel()
                if i % 7 == 0:
                    store.delete(f"shared-{(i + n) % 5}")
                if i % 11 == 0:
                    store.get(f"absent-{n}")
                    gets[n] += 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    stats = store.stats()
    assert stats["hits"] + stats["misses"] == sum(gets)
    assert 0 <= stats["ram_bytes"] <= 4 * size
    assert stats["ram_bytes"] == stats["ram_entries"] * size
    assert list(tmp_path.rglob("*.tmp")) == []
    for f in state_files(tmp_path):
        load_snapshot(f, model_id=MODEL)  # every file left behind is whole
