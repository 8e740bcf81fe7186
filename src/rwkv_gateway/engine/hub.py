"""Models from a hub: `hf://OWNER/REPO/PATH.pth[@REVISION]` specs, fetched into the Hugging Face cache.

A spec names one `.pth` file of a Hugging Face model repository (or of a mirror: `HF_ENDPOINT`). The
file lands in huggingface_hub's usual cache (`HF_HOME`, `HF_HUB_CACHE`), so it is shared with every
other tool that uses that cache, and a later start finds it there without the network: when the hub
cannot be reached, or `HF_HUB_OFFLINE=1`, the cached copy of the revision is used. `HF_TOKEN` reaches
private and gated repositories.

The download itself is resumable across runs, which huggingface_hub's own `hf_hub_download` no longer
is (it discards its partial file when a download fails): the bytes go to `blobs/<etag>.incomplete`
in the repository's cache folder, a later run continues it with a `Range` request, and only a
complete file of the announced size is renamed to its blob name. `hf_hub_download` then links the
blob into the cache's snapshot layout, so no half-written file is ever found under the model's name.
Progress shows as huggingface_hub's bar on a terminal and as log lines
(docs/models.md#models-from-a-hub).
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from rwkv_gateway.engine.loader import inspect_checkpoint
from rwkv_gateway.errors import ModelLoadError

if TYPE_CHECKING:
    from huggingface_hub import HfFileMetadata

logger = logging.getLogger(__name__)

SCHEME = "hf://"
DEFAULT_REVISION = "main"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_ETAG = re.compile(r"^[0-9A-Za-z_-]{1,128}$")
#: A progress line at least every this many seconds, and at every tenth of the file.
_LOG_EVERY_S = 30.0


@dataclass(frozen=True, slots=True)
class HubFile:
    """One file of a hub model repository at a revision (a branch, tag or commit)."""

    repo_id: str
    filename: str
    revision: str = DEFAULT_REVISION

    @property
    def spec(self) -> str:
        if self.revision == DEFAULT_REVISION:
            return f"{SCHEME}{self.repo_id}/{self.filename}"
        return f"{SCHEME}{self.repo_id}@{self.revision}/{self.filename}"

    @property
    def name(self) -> str:
        """The model id clients see by default: the file name without `.pth`, as for a local file."""
        return PurePosixPath(self.filename).stem


def is_hub_spec(value: object) -> bool:
    return isinstance(value, str) and value.startswith(SCHEME)


def parse_hub_spec(spec: str) -> HubFile:
    """`hf://OWNER/REPO/PATH.pth` with an optional revision, either where huggingface_hub's own URIs
    put it (`hf://OWNER/REPO@REVISION/PATH.pth`) or at the end (`hf://OWNER/REPO/PATH.pth@REVISION`).

    Every part is checked, so a spec can never name a file outside the cache (no `..`, no absolute or
    empty parts)."""
    if not spec.startswith(SCHEME):
        raise ModelLoadError(f"not a hub model spec (expected {SCHEME}OWNER/REPO/PATH.pth): {spec!r}")
    rest = spec[len(SCHEME) :]
    revision = DEFAULT_REVISION
    parts = rest.split("/")
    if len(parts) >= 2 and "@" in parts[1]:
        parts[1], _, tail = parts[1].partition("@")
        # The revision runs up to the path; a PR ref has slashes of its own (refs/pr/1).
        rev_parts = [tail, *parts[2:]]
        n_rev = 3 if tail == "refs" else 1
        revision = "/".join(rev_parts[:n_rev])
        parts = [parts[0], parts[1], *rev_parts[n_rev:]]
    elif "@" in rest:
        rest, _, revision = rest.partition("@")
        parts = rest.split("/")
    if len(parts) < 3:
        raise ModelLoadError(f"hub model spec {spec!r} names no file: expected {SCHEME}OWNER/REPO/PATH.pth")
    owner, repo, *path = parts
    for part in (owner, repo, *path):
        if not _NAME.match(part) or part in (".", "..") or ".." in part:
            raise ModelLoadError(f"hub model spec {spec!r}: invalid name {part!r}")
    if not _REVISION.match(revision) or ".." in revision or revision.endswith("/"):
        raise ModelLoadError(f"hub model spec {spec!r}: invalid revision {revision!r}")
    filename = "/".join(path)
    if not filename.endswith(".pth"):
        raise ModelLoadError(f"hub model spec {spec!r} must name an RWKV checkpoint file (.pth)")
    return HubFile(repo_id=f"{owner}/{repo}", filename=filename, revision=revision)


def resolve_model(spec: str, *, endpoint: str | None = None, cache_dir: Path | None = None) -> Path:
    """The local path of the checkpoint a hub spec names, downloaded (or resumed) when not cached,
    checked to be an RWKV checkpoint. Every failure is one `ModelLoadError`."""
    path = fetch(parse_hub_spec(spec), endpoint=endpoint, cache_dir=cache_dir)
    inspect_checkpoint(path)
    return path


def fetch(file: HubFile, *, endpoint: str | None = None, cache_dir: Path | None = None) -> Path:
    """Download `file` into the hub cache unless it is there; the cached copy when the hub is out of
    reach. `endpoint` and `cache_dir` default to what huggingface_hub reads from the environment."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url

    _route_library_logs()
    where = endpoint or constants.ENDPOINT
    if constants.is_offline_mode():
        return _cached(file, endpoint, cache_dir, reason="HF_HUB_OFFLINE is set", asked=True)
    url = hf_hub_url(file.repo_id, file.filename, revision=file.revision, endpoint=endpoint)
    try:
        meta = get_hf_file_metadata(url, endpoint=endpoint)
    except Exception as exc:
        unreachable = _hub_error(exc, file, where)
        return _cached(file, endpoint, cache_dir, reason=unreachable)
    # Both name files in the cache: a server's answer must not choose an arbitrary path.
    if not _COMMIT.match(meta.commit_hash or "") or not _ETAG.match(meta.etag or ""):
        raise ModelLoadError(
            f"{where} does not answer like a Hugging Face hub (no valid X-Repo-Commit and ETag headers "
            f"for {file.spec}); check HF_ENDPOINT"
        )
    cache = Path(cache_dir or constants.HF_HUB_CACHE).expanduser()
    try:
        _download_blob(file, url, meta, cache)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(
            f"downloading {file.spec} failed ({_download_failure(exc, meta.location)}); what arrived is "
            "kept, and the next pull or serve resumes it"
        ) from None
    return _link(file, endpoint, cache)


def _route_library_logs() -> None:
    """huggingface_hub writes its warnings through a handler of its own as well as to ours: a second,
    unformatted copy of every line, which would break JSON logs. Its lines go through ours only.
    httpx2 (its HTTP client) logs every request at info level; its warnings and errors remain."""
    logging.getLogger("huggingface_hub").handlers.clear()
    logging.getLogger("httpx2").setLevel(logging.WARNING)


def _hub_error(exc: Exception, file: HubFile, where: str) -> str:
    """Raise the error the hub's answer means; return a reason to use the cache when it gave none."""
    import httpx2
    from huggingface_hub import errors

    if isinstance(exc, errors.GatedRepoError):
        raise ModelLoadError(
            f"{file.repo_id} on {where} is gated: accept its terms on the hub and set HF_TOKEN"
        ) from None
    if isinstance(exc, errors.RepositoryNotFoundError):
        raise ModelLoadError(
            f"no repository {file.repo_id} on {where} (a private one needs HF_TOKEN)"
        ) from None
    if isinstance(exc, errors.RevisionNotFoundError):
        raise ModelLoadError(f"no revision {file.revision!r} in {file.repo_id} on {where}") from None
    if isinstance(exc, errors.RemoteEntryNotFoundError):
        raise ModelLoadError(
            f"no file {file.filename} in {file.repo_id} at {file.revision} on {where}"
        ) from None
    if isinstance(exc, errors.HfHubHTTPError):
        status = exc.response.status_code
        if status in (401, 403):
            raise ModelLoadError(f"{where} refused {file.spec} (HTTP {status}): check HF_TOKEN") from None
        if status == 404:  # from a mirror that does not say what is missing
            raise ModelLoadError(f"{file.spec} not found on {where} (HTTP 404)") from None
        return f"{where} answered HTTP {status}"
    if isinstance(exc, httpx2.TransportError | OSError):
        return f"cannot reach {where} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    raise ModelLoadError(f"{file.spec}: {type(exc).__name__}: {exc}") from None


def _download_failure(exc: Exception, location: str) -> str:
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(exc, HfHubHTTPError):
        # Not the message: it quotes the URL, which for a CDN is signed (a credential for a while).
        return f"HTTP {exc.response.status_code} from {urlsplit(location).hostname}"
    first = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {first}"


def _cached(
    file: HubFile, endpoint: str | None, cache_dir: Path | None, *, reason: str, asked: bool = False
) -> Path:
    """The cached copy of the revision; `asked`: the operator chose the cache (no warning then)."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        path = hf_hub_download(
            file.repo_id,
            file.filename,
            revision=file.revision,
            endpoint=endpoint,
            cache_dir=cache_dir,
            local_files_only=True,
        )
    except LocalEntryNotFoundError:
        cache = cache_dir or constants.HF_HUB_CACHE
        raise ModelLoadError(f"{reason}, and {file.spec} is not in the hub cache ({cache})") from None
    logger.log(logging.INFO if asked else logging.WARNING, "%s: using the cached %s", reason, file.spec)
    return Path(str(path))


def _download_blob(file: HubFile, url: str, meta: HfFileMetadata, cache: Path) -> None:
    """Fetch the blob `meta` describes into the cache, continuing an earlier partial download."""
    from huggingface_hub.file_download import http_get, repo_folder_name
    from huggingface_hub.utils import WeakFileLock, build_hf_headers

    assert meta.etag is not None
    folder = repo_folder_name(repo_id=file.repo_id, repo_type="model")
    blob = cache / folder / "blobs" / meta.etag
    if blob.exists():
        return
    blob.parent.mkdir(parents=True, exist_ok=True)
    partial = blob.with_name(blob.name + ".incomplete")
    lock = cache / ".locks" / folder / f"{meta.etag}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    headers = build_hf_headers()
    # A redirect to another host (a CDN) gets no token: its signed URL is its own authorisation.
    if urlsplit(meta.location).hostname != urlsplit(url).hostname:
        headers.pop("authorization", None)
    with WeakFileLock(lock):
        if blob.exists():  # another process finished it while this one waited
            return
        done = partial.stat().st_size if partial.exists() else 0
        if meta.size is not None and done > meta.size:
            partial.unlink()
            done = 0
        total = f"{meta.size / 2**20:.1f} MiB" if meta.size is not None else "unknown size"
        if done:
            logger.info("resuming %s at %.1f MiB of %s", file.spec, done / 2**20, total)
        else:
            logger.info("downloading %s (%s) into %s", file.spec, total, cache)
        t0 = time.monotonic()
        with partial.open("ab") as out:
            http_get(
                meta.location,
                out,
                resume_size=done,
                headers=headers,
                expected_size=meta.size,
                displayed_filename=PurePosixPath(file.filename).name,
                tqdm_class=_progress_class(file.spec),
            )
            out.flush()
            os.fsync(out.fileno())
        got = partial.stat().st_size
        if meta.size is not None and got != meta.size:
            raise ModelLoadError(f"{file.spec}: got {got} bytes of {meta.size}; run again to resume")
        os.replace(partial, blob)
        elapsed = max(time.monotonic() - t0, 1e-6)
        logger.info(
            "downloaded %s: %.1f MiB in %.1f s (%.1f MiB/s)",
            file.spec,
            got / 2**20,
            elapsed,
            (got - done) / 2**20 / elapsed,
        )


def _link(file: HubFile, endpoint: str | None, cache: Path) -> Path:
    """The blob is in place: huggingface_hub links it into the snapshot layout and records the
    revision's commit, exactly as after a download of its own."""
    from huggingface_hub import hf_hub_download

    try:
        path = hf_hub_download(
            file.repo_id, file.filename, revision=file.revision, endpoint=endpoint, cache_dir=cache
        )
    except Exception as exc:
        raise ModelLoadError(f"{file.spec}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
    return Path(str(path))


def _progress_class(spec: str) -> type[Any]:
    """huggingface_hub's progress bar, drawn when stderr is a terminal; otherwise (a log file, a
    container's log) a line at every tenth of the file and at least every `_LOG_EVERY_S` seconds. Not
    both: the log lines would break into the bar's line on the same terminal."""
    from huggingface_hub.utils import tqdm as hub_tqdm

    class LoggedProgress(hub_tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
            self._done = int(kwargs.get("initial") or 0)
            self._size = kwargs.get("total")
            self._t0 = self._last_t = time.monotonic()
            self._start = self._done
            self._last_tenth = self._tenth()
            self._drawn = not self.disable

        def _tenth(self) -> int:
            return self._done * 10 // self._size if self._size else 0

        def update(self, n: float | None = 1) -> bool | None:
            shown: bool | None = super().update(n)
            self._done += int(n or 0)
            now = time.monotonic()
            tenth = self._tenth()
            if self._drawn:
                return shown
            if tenth != self._last_tenth or now - self._last_t >= _LOG_EVERY_S:
                self._last_tenth, self._last_t = tenth, now
                rate = (self._done - self._start) / 2**20 / max(now - self._t0, 1e-6)
                if self._size:
                    logger.info(
                        "downloading %s: %d%% (%.1f of %.1f MiB, %.1f MiB/s)",
                        spec,
                        self._done * 100 // self._size,
                        self._done / 2**20,
                        self._size / 2**20,
                        rate,
                    )
                else:
                    logger.info("downloading %s: %.1f MiB (%.1f MiB/s)", spec, self._done / 2**20, rate)
            return shown

    return LoggedProgress
