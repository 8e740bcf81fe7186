"""The state store: RNN state snapshots kept in a byte-budgeted host-memory LRU and, on request, in files.

`StateStore` owns the in-memory cache (thread-safe; used from the model thread and from async
services via `asyncio.to_thread`) and the on-disk layout under one directory. `save_snapshot` and
`load_snapshot` own the file format: magic `RWKVGWS1`, a little-endian uint32 header length, a
UTF-8 JSON header (key, model id, version, token count, layout, numel, logits numel, dtype, payload
sha256) and the raw little-endian float32 payload (state buffer, then logits if any). Files are
written atomically and durably; anything that fails validation on load raises `StateMismatch`
instead of yielding a state.

Several replicas may share the directory (docs/deployment.md#scaling-past-one-gpu). A temp file's
name says which process writes it (host name and pid), so the start-up clean-up removes only temp
files that cannot be in use: this host's of a process that is gone (or of this very pid: a previous
life of a restarted container), and anyone's older than `ORPHAN_TMP_AGE_S`. Another replica's
write in progress is never touched.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import socket
import struct
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rwkv_gateway.engine.snapshot import StateLayout, StateSnapshot, dtype_from_name
from rwkv_gateway.engine.threads import on_one_thread
from rwkv_gateway.errors import StateMismatch

logger = logging.getLogger(__name__)

MAGIC = b"RWKVGWS1"
FORMAT_VERSION = 1
_LEN = struct.Struct("<I")
_PREFIX = len(MAGIC) + _LEN.size
# A real header is a few hundred bytes per layer; anything far beyond this is a corrupt length field.
_MAX_HEADER = 16 * 1024 * 1024
_STATE_SUFFIX = ".state"
_TMP_SUFFIX = ".tmp"
#: A temp file this old is an orphan whoever wrote it (a write takes seconds at most).
ORPHAN_TMP_AGE_S = 3600.0


def _host() -> str:
    # Dots split the temp name's fields, so the host keeps none of its own.
    return socket.gethostname().replace(".", "_")


def _writer_tag() -> str:
    return f"{_host()}@{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _orphaned(tmp: Path, now: float) -> bool:
    """Whether the temp file `tmp` cannot belong to a write in progress (see the module docstring)."""
    try:
        age = now - tmp.stat().st_mtime
    except FileNotFoundError:
        return False  # finished (renamed) meanwhile
    if age > ORPHAN_TMP_AGE_S:
        return True
    # ".<name>.<host>@<pid>.<random>.tmp"; files without a tag come from older versions.
    fields = tmp.name.removesuffix(_TMP_SUFFIX).split(".")
    tag = fields[-2] if len(fields) >= 4 else ""
    host, _, pid = tag.rpartition("@")
    if not pid.isdigit():
        return True
    if host != _host():
        return False
    return int(pid) == os.getpid() or not _pid_alive(int(pid))


# Striped per-key locks: operations on one key are serialised (so a slow file write cannot be
# overtaken by an older/newer RAM update of the same key) without one global lock around disk I/O.
_KEY_STRIPES = 64


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def _fsync_dir(directory: Path) -> None:
    # Directory fsync makes the rename itself durable; it is a POSIX notion (Windows cannot open dirs).
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _le_float32(t: torch.Tensor, what: str) -> np.ndarray:
    if t.dtype != torch.float32:
        raise ValueError(f"state snapshot {what} must be float32, not {t.dtype}")
    # .cpu()/.contiguous() return the same tensor when already so; we only read from it.
    arr: np.ndarray = t.detach().reshape(-1).cpu().contiguous().numpy()
    if sys.byteorder != "little":
        arr = arr.astype("<f4")
    return arr


def save_snapshot(path: Path, snap: StateSnapshot, *, key: str | None = None) -> None:
    """Write `snap` to `path` atomically: a temp file in the same directory, fsync, rename, fsync dir.

    `key` (the store key) is recorded in the header so a load can verify the file belongs to it. The
    payload is the state buffer followed by the logits, if the snapshot carries them.
    """
    parts = [_le_float32(snap.flat, "buffer")]
    if snap.logits is not None:
        parts.append(_le_float32(snap.logits, "logits"))
    views = [a.data.cast("B") for a in parts]
    digest = hashlib.sha256()
    for v in views:
        digest.update(v)
    header = {
        "format": FORMAT_VERSION,
        "key": key,
        "model_id": snap.model_id,
        "version": snap.version,
        "token_count": snap.token_count,
        "layout": snap.layout.to_json(),
        "numel": int(parts[0].size),
        # null (not 0) for "no logits", so an empty logits tensor would round-trip as itself.
        "logits_numel": int(parts[1].size) if snap.logits is not None else None,
        "dtype": "float32",
        "sha256": digest.hexdigest(),
    }
    # Default ASCII escaping keeps keys with lone surrogates encodable; json.loads restores them.
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    directory = path.parent
    prefix = f".{path.name}.{_writer_tag()}."
    fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=prefix, suffix=_TMP_SUFFIX)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(MAGIC + _LEN.pack(len(header_bytes)) + header_bytes)
            for v in views:
                f.write(v)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(directory)


def _corrupt(path: Path, reason: str) -> StateMismatch:
    return StateMismatch(f"state file {path.name} is corrupt: {reason}")


def _str_field(header: dict[str, Any], name: str, path: Path) -> str:
    value = header.get(name)
    if not isinstance(value, str):
        raise _corrupt(path, f"header field {name!r} is missing or not a string")
    return value


def _int_field(header: dict[str, Any], name: str, path: Path) -> int:
    value = header.get(name)
    # bool is an int subclass; a JSON true is never a valid count.
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise _corrupt(path, f"header field {name!r} is missing or not a non-negative integer")
    return value


def _read_exact(f: io.BufferedReader, n: int, path: Path) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise _corrupt(path, "file is truncated")
    return data


def _read_floats(
    f: io.BufferedReader, n: int, hash_update: Callable[[memoryview], object], path: Path
) -> torch.Tensor:
    # Read straight into the tensor's own memory: one allocation, no intermediate bytes copy.
    out = torch.empty(n, dtype=torch.float32)
    view = out.numpy().data.cast("B")
    got = 0
    while got < len(view):
        k = f.readinto(view[got:])
        if not k:
            raise _corrupt(path, "payload is truncated")
        got += k
    hash_update(view)
    if sys.byteorder != "little":
        out.numpy().byteswap(inplace=True)
    return out


def load_snapshot(
    path: Path,
    *,
    model_id: str | None = None,
    device: str | torch.device = "cpu",
    key: str | None = None,
) -> StateSnapshot:
    """Read and validate a snapshot file.

    Raises FileNotFoundError when there is no file, and StateMismatch when it is corrupt, belongs to
    another key (when `key` is given) or was made by another model (when `model_id` is given).
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < _PREFIX:
            raise _corrupt(path, f"only {size} bytes")
        prefix = _read_exact(f, _PREFIX, path)
        if prefix[: len(MAGIC)] != MAGIC:
            raise _corrupt(path, "bad magic bytes")
        (header_len,) = _LEN.unpack_from(prefix, len(MAGIC))
        if header_len > _MAX_HEADER or _PREFIX + header_len > size:
            raise _corrupt(path, f"header length {header_len} exceeds the file")
        try:
            header = json.loads(_read_exact(f, header_len, path).decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise _corrupt(path, f"unreadable header ({exc.__class__.__name__})") from None
        if not isinstance(header, dict):
            raise _corrupt(path, "header is not an object")
        if header.get("format") != FORMAT_VERSION:
            raise _corrupt(path, f"unknown format {header.get('format')!r}")
        if header.get("dtype") != "float32":
            raise _corrupt(path, f"unsupported payload dtype {header.get('dtype')!r}")
        if key is not None and header.get("key") != key:
            raise _corrupt(path, "it belongs to another key")
        file_model = _str_field(header, "model_id", path)
        if model_id is not None and file_model != model_id:
            raise StateMismatch(
                f"state file {path.name} was made by model {file_model}, not the loaded model {model_id}"
            )
        version = _str_field(header, "version", path)
        token_count = _int_field(header, "token_count", path)
        numel = _int_field(header, "numel", path)
        checksum = _str_field(header, "sha256", path)
        layout_json = header.get("layout")
        if not isinstance(layout_json, dict):
            raise _corrupt(path, "header field 'layout' is missing or not an object")
        try:
            layout = StateLayout.from_json(layout_json)
            for dt in layout.dtypes:
                dtype_from_name(dt)
        except (StateMismatch, ValueError, TypeError) as exc:
            raise _corrupt(path, f"bad layout ({exc})") from None
        if any(d < 0 for shape in layout.shapes for d in shape):
            raise _corrupt(path, "negative dimension in layout")
        if layout.numel != numel:
            raise _corrupt(path, f"layout holds {layout.numel} values, header says {numel}")
        logits_numel: int | None = None
        if header.get("logits_numel") is not None:
            logits_numel = _int_field(header, "logits_numel", path)
        expected = (numel + (logits_numel or 0)) * 4
        # Checked before allocating, so a lying header cannot make us allocate more than the file holds.
        if size - _PREFIX - header_len != expected:
            raise _corrupt(path, f"payload is {size - _PREFIX - header_len} bytes, expected {expected}")
        digest = hashlib.sha256()
        flat = _read_floats(f, numel, digest.update, path)
        logits = None if logits_numel is None else _read_floats(f, logits_numel, digest.update, path)
        if f.read(1):
            raise _corrupt(path, "trailing bytes after the payload")
    if digest.hexdigest() != checksum:
        raise _corrupt(path, "payload checksum mismatch")
    if torch.device(device).type != "cpu":
        flat = flat.to(device)
        logits = None if logits is None else logits.to(device)
    return StateSnapshot(
        flat=flat,
        layout=layout,
        model_id=file_model,
        version=version,
        token_count=token_count,
        logits=logits,
    )


class StateStore:
    """Snapshots by key: a RAM LRU bounded by `budget_bytes`, plus write-through files for persisted keys.

    A key maps to the last snapshot `put` under it. Persisted entries survive RAM eviction and
    restarts; non-persisted ones are a pure cache and vanish when evicted. Keys never become paths:
    a file is named by the key's sha256 (fanned out by its first two hex digits) and the key is
    stored inside and verified on load.
    """

    def __init__(self, directory: Path, *, budget_bytes: int, model_id: str) -> None:
        if budget_bytes < 0:
            raise ValueError("budget_bytes must be >= 0")
        self.directory = Path(directory)
        self.budget_bytes = budget_bytes
        self.model_id = model_id
        self.directory.mkdir(parents=True, exist_ok=True)
        # Temp files only exist mid-write: this process' own were orphaned by a crash, but another
        # replica sharing the directory may be writing its own now (see the module docstring).
        removed = 0
        now = time.time()
        for tmp in self.directory.rglob(f"*{_TMP_SUFFIX}"):
            if tmp.is_file() and _orphaned(tmp, now):
                tmp.unlink(missing_ok=True)
                removed += 1
        if removed:
            logger.warning("removed %s leftover temp files from %s", removed, self.directory)
        self._lock = threading.Lock()
        self._key_locks = [threading.Lock() for _ in range(_KEY_STRIPES)]
        self._lru: OrderedDict[str, StateSnapshot] = OrderedDict()
        self._ram_bytes = 0
        self._hits = 0
        self._misses = 0
        self._disk_writes = 0
        self._disk_reads = 0
        self._evictions = 0

    # -- paths -------------------------------------------------------------------------------------

    def _path(self, digest: str) -> Path:
        return self.directory / digest[:2] / f"{digest}{_STATE_SUFFIX}"

    def _key_lock(self, digest: str) -> threading.Lock:
        return self._key_locks[int(digest[:8], 16) % _KEY_STRIPES]

    # -- LRU bookkeeping (call with self._lock held) -----------------------------------------------

    def _drop(self, key: str) -> None:
        old = self._lru.pop(key, None)
        if old is not None:
            self._ram_bytes -= old.nbytes

    def _insert(self, key: str, snap: StateSnapshot) -> None:
        self._drop(key)
        if snap.nbytes > self.budget_bytes:
            return
        self._lru[key] = snap
        self._ram_bytes += snap.nbytes
        while self._ram_bytes > self.budget_bytes:
            _, evicted = self._lru.popitem(last=False)
            self._ram_bytes -= evicted.nbytes
            self._evictions += 1

    # -- public API --------------------------------------------------------------------------------

    def put(self, key: str, snap: StateSnapshot, *, persist: bool = False) -> None:
        """Cache `snap` under `key`; with `persist`, also write its file before returning. The cache
        holds host memory only (the budget is RAM): a snapshot on a device is copied to the host."""
        snap.check_model(self.model_id)
        snap = snap.to_host()
        digest = _digest(key)
        path = self._path(digest)
        with self._key_lock(digest):
            if persist:
                parent = path.parent
                if not parent.is_dir():
                    parent.mkdir(exist_ok=True)
                    _fsync_dir(self.directory)
                with on_one_thread():  # services call this on borrowed threads (engine/threads.py)
                    save_snapshot(path, snap, key=key)
            else:
                # An older persisted value would resurface after eviction; the new value supersedes it.
                path.unlink(missing_ok=True)
            with self._lock:
                if persist:
                    self._disk_writes += 1
                self._insert(key, snap)
        logger.debug("state put %s bytes persist=%s", snap.nbytes, persist)

    def get(self, key: str) -> StateSnapshot | None:
        """The snapshot under `key` from RAM, else from its file, else None. Corrupt files raise."""
        with self._lock:
            snap = self._lru.get(key)
            if snap is not None:
                self._lru.move_to_end(key)
                self._hits += 1
                return snap
        digest = _digest(key)
        with self._key_lock(digest):
            with self._lock:
                # Another thread may have loaded (or put) it while we waited for the key lock.
                snap = self._lru.get(key)
                if snap is not None:
                    self._lru.move_to_end(key)
                    self._hits += 1
                    return snap
            try:
                with on_one_thread():
                    snap = load_snapshot(self._path(digest), model_id=self.model_id, key=key)
            except FileNotFoundError:
                with self._lock:
                    self._misses += 1
                return None
            with self._lock:
                self._hits += 1
                self._disk_reads += 1
                self._insert(key, snap)
        return snap

    def delete(self, key: str) -> None:
        """Forget `key` in RAM and on disk; a missing key is not an error."""
        digest = _digest(key)
        with self._key_lock(digest):
            with self._lock:
                self._drop(key)
            self._path(digest).unlink(missing_ok=True)

    def forget_cached(self, key: str) -> None:
        """Forget `key` in RAM only: the next get reads its file again (which another replica
        sharing the data directory may have rewritten)."""
        with self._lock:
            self._drop(key)

    def __contains__(self, key: str) -> bool:
        with self._lock:
            if key in self._lru:
                return True
        return self._path(_digest(key)).is_file()

    def stats(self) -> dict[str, int]:
        """Counters: `hits` counts every get that returned a snapshot (RAM or disk; `disk_reads` of
        them came from files), `misses` every get that returned None."""
        with self._lock:
            return {
                "hits": self._hits,
                "misses": self._misses,
                "ram_bytes": self._ram_bytes,
                "ram_entries": len(self._lru),
                "disk_writes": self._disk_writes,
                "disk_reads": self._disk_reads,
                "evictions": self._evictions,
            }

    def clear_ram(self) -> None:
        """Drop every RAM entry; persisted files stay."""
        with self._lock:
            self._lru.clear()
            self._ram_bytes = 0
