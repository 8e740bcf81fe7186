"""A local stand-in for the Hugging Face hub's file routes, for `HF_ENDPOINT`.

It answers what huggingface_hub asks when it downloads one file (docs/models.md#models-from-a-hub):

- `HEAD /{owner}/{repo}/resolve/{revision}/{path}`: like the hub for an LFS file, a 302 to a "CDN"
  URL on another host name (`localhost` instead of `127.0.0.1`) carrying `X-Repo-Commit`,
  `X-Linked-Etag` (the sha256) and `X-Linked-Size`; 404 with the hub's `X-Error-Code`
  (`RepoNotFound`, `RevisionNotFound`, `EntryNotFound`) for what does not exist.
- `GET /cdn/{sha256}` with or without `Range: bytes=N-`: the bytes (206 for a range).

No Xet headers are sent, so the client takes the plain HTTP path. Faults for the resume tests:
`cut_at` ends the next GET's connection after that many bytes, once; `fail_after` answers 500 to
every GET after that many; `pause_at` stops the next GET after that many bytes until `release` is
set (a client can then be interrupted mid-download).
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

#: The repository and file the tests' hub holds (a generated checkpoint), and its spec.
REPO = "BlinkDL/rwkv7-g1"
FILE = "tiny/rwkv7-g1-tiny-ctx4096.pth"
SPEC = f"hf://{REPO}/{FILE}"

_RESOLVE = re.compile(r"^/(?P<owner>[^/]+)/(?P<repo>[^/]+)/resolve/(?P<revision>[^/]+)/(?P<path>.+)$")
_CDN = re.compile(r"^/cdn/(?P<sha>[0-9a-f]{64})$")


@dataclass
class Request:
    method: str
    path: str
    range: str | None
    authorization: str | None


@dataclass
class FakeHub:
    #: repo id -> file path -> bytes; every repository has one commit, named by "main" or its hash.
    repos: dict[str, dict[str, bytes]] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    cut_at: int | None = None
    #: GETs after this many answer 500 (the storage host fails for good).
    fail_after: int | None = None
    pause_at: int | None = None
    paused: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add(self, repo_id: str, path: str, data: bytes) -> None:
        self.repos.setdefault(repo_id, {})[path] = data

    def commit(self, repo_id: str) -> str:
        return hashlib.sha1(repo_id.encode()).hexdigest()

    def blob(self, sha: str) -> bytes | None:
        for files in self.repos.values():
            for data in files.values():
                if hashlib.sha256(data).hexdigest() == sha:
                    return data
        return None

    def gets(self) -> list[Request]:
        return [r for r in self.requests if r.method == "GET"]


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def _record(self) -> None:
            hub.requests.append(
                Request(self.command, self.path, self.headers.get("Range"), self.headers.get("Authorization"))
            )

        def _error(self, code: str, commit: str | None = None) -> None:
            self.send_response(404)
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", f"{code} (fake hub)")
            if commit:
                self.send_header("X-Repo-Commit", commit)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_HEAD(self) -> None:
            self._record()
            m = _RESOLVE.match(self.path)
            if m is None:
                self._error("RepoNotFound")
                return
            repo_id = f"{unquote(m['owner'])}/{unquote(m['repo'])}"
            files = hub.repos.get(repo_id)
            if files is None:
                self._error("RepoNotFound")
                return
            commit = hub.commit(repo_id)
            if unquote(m["revision"]) not in ("main", commit):
                self._error("RevisionNotFound")
                return
            data = files.get(unquote(m["path"]))
            if data is None:
                self._error("EntryNotFound", commit)
                return
            sha = hashlib.sha256(data).hexdigest()
            self.send_response(302)
            self.send_header("Location", f"http://localhost:{hub.port}/cdn/{sha}")
            self.send_header("X-Repo-Commit", commit)
            self.send_header("X-Linked-Etag", f'"{sha}"')
            self.send_header("X-Linked-Size", str(len(data)))
            self.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_GET(self) -> None:
            self._record()
            m = _CDN.match(self.path)
            data = hub.blob(m["sha"]) if m else None
            failing = hub.fail_after is not None and len(hub.gets()) > hub.fail_after
            if data is None or failing:
                self.send_response(500 if failing else 404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start = 0
            asked = self.headers.get("Range")
            if asked:
                start = int(re.fullmatch(r"bytes=(\d+)-", asked)[1])  # type: ignore[index]
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            body = data[start:]
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            cut, hub.cut_at = hub.cut_at, None
            pause, hub.pause_at = hub.pause_at, None
            try:
                if cut is not None:
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                if pause is not None:
                    self.wfile.write(body[:pause])
                    self.wfile.flush()
                    hub.paused.set()
                    hub.release.wait(60)
                    body = body[pause:]
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True

    return Handler


@contextmanager
def serve_hub(hub: FakeHub) -> Iterator[FakeHub]:
    """Run `hub` on a free port of 127.0.0.1 in a thread until the block ends."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    server.daemon_threads = True
    hub.port = server.server_address[1]
    # A short poll interval: shutdown() waits for the next poll (0.5 s by default) at every test's end.
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), name="fake-hub", daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        hub.release.set()
        server.shutdown()
        server.server_close()
        thread.join(10)
