"""Models from a hub: `hf://` specs, downloads into the Hugging Face cache through `HF_ENDPOINT`,
resuming, the cache without network, and the `pull` / `serve --model hf://...` commands.

The hub is a local fake (hub_server.py) that answers huggingface_hub's real requests; nothing here
mocks huggingface_hub itself.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from hub_server import FILE, REPO, SPEC, FakeHub

from rwkv_gateway.engine.hub import HubFile, parse_hub_spec, resolve_model
from rwkv_gateway.engine.loader import inspect_checkpoint
from rwkv_gateway.errors import ModelLoadError
from rwkv_gateway.settings import Settings
from support import free_port

CLI = [sys.executable, "-m", "rwkv_gateway"]


def cli(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, env={**os.environ, **env}, timeout=timeout, check=False
    )


def one_error_line(out: subprocess.CompletedProcess[str]) -> str:
    """The command failed with exactly one `error:` line, the last, and no traceback."""
    assert out.returncode != 0, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    lines = out.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert errors == [lines[-1]], out.stderr
    return errors[0]


def repo_cache(cache: Path) -> Path:
    return cache / "models--BlinkDL--rwkv7-g1"


# ---------------------------------------------------------------------------- specs


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("hf://BlinkDL/rwkv7-g1/a.pth", HubFile("BlinkDL/rwkv7-g1", "a.pth")),
        ("hf://BlinkDL/rwkv7-g1/dir/a-0.4b.pth@v1.0", HubFile("BlinkDL/rwkv7-g1", "dir/a-0.4b.pth", "v1.0")),
        ("hf://o/r@0123abc/a.pth", HubFile("o/r", "a.pth", "0123abc")),
        ("hf://o/r@refs/pr/3/d/a.pth", HubFile("o/r", "d/a.pth", "refs/pr/3")),
    ],
)
def test_specs(spec: str, expected: HubFile) -> None:
    assert parse_hub_spec(spec) == expected
    assert parse_hub_spec(expected.spec) == expected
    assert expected.name == Path(expected.filename).stem


@pytest.mark.parametrize(
    "spec",
    [
        "hf://BlinkDL/rwkv7-g1",
        "hf://BlinkDL/a.pth",
        "hf://BlinkDL/rwkv7-g1/../../etc/x.pth",
        "hf://BlinkDL/rwkv7-g1/a/..pth",
        "hf://BlinkDL//a.pth",
        "hf:///abs/r/a.pth",
        "hf://BlinkDL/rwkv7-g1/a.safetensors",
        "hf://BlinkDL/rwkv7-g1/a.pth@",
        "hf://BlinkDL/rwkv7-g1/a.pth@../main",
        "hf://BlinkDL/rwkv7-g1/a\\b.pth",
        "hf://-x/r/a.pth",
        "hf://o/r/a b.pth",
        "/models/a.pth",
    ],
)
def test_bad_specs_are_refused(spec: str) -> None:
    with pytest.raises(ModelLoadError):
        parse_hub_spec(spec)


def test_settings_keep_the_spec_and_take_paths() -> None:
    assert Settings(model=SPEC).model == SPEC
    assert Settings(model=Path("/m/a.pth")).model == "/m/a.pth"  # type: ignore[arg-type]
    assert Settings(model="").model is None


# ---------------------------------------------------------------------------- downloads, in process


def test_download_resumes_after_a_cut_and_later_needs_no_network(hub: FakeHub, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    size = len(hub.repos[REPO][FILE])
    hub.cut_at = size // 2
    path = resolve_model(SPEC, endpoint=hub.url, cache_dir=cache)
    assert path.name == Path(FILE).name and path.read_bytes() == hub.repos[REPO][FILE]
    assert inspect_checkpoint(path).version == "7"
    first, second = hub.gets()
    assert first.range is None and second.range is not None
    assert 0 < int(second.range.removeprefix("bytes=").rstrip("-")) <= size // 2
    blobs = repo_cache(cache) / "blobs"
    assert [p.name for p in blobs.iterdir() if p.name.endswith(".incomplete")] == []
    assert (repo_cache(cache) / "refs" / "main").read_text() == hub.commit(REPO)

    # A second start downloads nothing; with the hub gone it uses the cached revision.
    assert resolve_model(SPEC, endpoint=hub.url, cache_dir=cache) == path
    assert len(hub.gets()) == 2
    gone = f"http://127.0.0.1:{free_port()}"
    assert resolve_model(SPEC, endpoint=gone, cache_dir=cache) == path


def test_a_failed_download_keeps_what_arrived(hub: FakeHub, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    size = len(hub.repos[REPO][FILE])
    hub.cut_at, hub.fail_after = size // 2, 1
    with pytest.raises(ModelLoadError, match=r"failed \(HTTP 500 from localhost\).*resumes"):
        resolve_model(SPEC, endpoint=hub.url, cache_dir=cache)
    (partial,) = (repo_cache(cache) / "blobs").glob("*.incomplete")
    kept = partial.stat().st_size
    assert 0 < kept < size
    assert not (repo_cache(cache) / "snapshots").exists()
    hub.fail_after = None
    path = resolve_model(SPEC, endpoint=hub.url, cache_dir=cache)
    assert hub.gets()[-1].range == f"bytes={kept}-"
    assert path.read_bytes() == hub.repos[REPO][FILE]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("hf://nobody/nothing/a.pth", "no repository nobody/nothing"),
        (f"hf://{REPO}/missing.pth", f"no file missing.pth in {REPO}"),
        (f"hf://{REPO}/{FILE}@v9", "no revision 'v9'"),
        (f"hf://{REPO}/garbage.pth", "not a PyTorch checkpoint"),
    ],
)
def test_hub_errors(hub: FakeHub, tmp_path: Path, spec: str, message: str) -> None:
    with pytest.raises(ModelLoadError, match=message):
        resolve_model(spec, endpoint=hub.url, cache_dir=tmp_path / "cache")


def test_unreachable_hub_and_nothing_cached(tmp_path: Path) -> None:
    gone = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ModelLoadError, match=r"cannot reach .*not in the hub cache"):
        resolve_model(SPEC, endpoint=gone, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache" / "models--BlinkDL--rwkv7-g1" / "snapshots").exists()


def test_an_endpoint_that_is_no_hub(v7_path: Path, tmp_path: Path) -> None:
    # A plain file server where HF_ENDPOINT should name a hub mirror: it has the file at the right
    # path, but without the hub's headers nothing proves which commit it is.
    root = tmp_path / "www"
    (root / REPO / "resolve" / "main" / FILE).parent.mkdir(parents=True)
    (root / REPO / "resolve" / "main" / FILE).write_bytes(v7_path.read_bytes())
    handler = functools.partial(QuietFiles, directory=str(root))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        with pytest.raises(ModelLoadError, match="does not answer like a Hugging Face hub"):
            resolve_model(SPEC, endpoint=url, cache_dir=tmp_path / "cache")
        with pytest.raises(ModelLoadError, match=r"not found on .* \(HTTP 404\)"):
            resolve_model(f"hf://{REPO}/other.pth", endpoint=url, cache_dir=tmp_path / "cache")
    finally:
        server.shutdown()
        server.server_close()


class QuietFiles(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


# ---------------------------------------------------------------------------- the commands


def test_pull_prints_the_path_logs_progress_and_sends_the_token(hub: FakeHub, hf_env: dict[str, str]) -> None:
    out = cli("pull", SPEC, env={**hf_env, "HF_TOKEN": "hf_secret"})
    assert out.returncode == 0, out.stderr
    path = Path(out.stdout.strip())
    assert path.is_relative_to(Path(hf_env["HF_HOME"]) / "hub") and path.name == Path(FILE).name
    assert inspect_checkpoint(path).version == "7"
    assert "downloading " + SPEC in out.stderr and "100%" in out.stderr and "downloaded" in out.stderr
    head, get = hub.requests[0], hub.gets()[0]
    # The token goes to the hub, never to the CDN its redirect points at.
    assert head.authorization == "Bearer hf_secret" and get.authorization is None
    # Offline, the cache answers at once.
    again = cli("pull", SPEC, env={**hf_env, "HF_HUB_OFFLINE": "1"})
    assert again.returncode == 0 and again.stdout.strip() == str(path), again.stderr
    assert len(hub.gets()) == 1


def test_an_interrupted_pull_resumes(hub: FakeHub, hf_env: dict[str, str]) -> None:
    size = len(hub.repos[REPO][FILE])
    hub.pause_at = size * 3 // 4
    proc = subprocess.Popen(
        [*CLI, "pull", SPEC],
        env={**os.environ, **hf_env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert hub.paused.wait(60), "the download never started"
        time.sleep(0.5)  # let the client write what it has received
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and err.strip().splitlines()[-1].startswith("error: interrupted"), err
    cache = repo_cache(Path(hf_env["HF_HOME"]) / "hub")
    (partial,) = (cache / "blobs").glob("*.incomplete")
    kept = partial.stat().st_size
    assert 0 < kept < size
    # Nothing under the file's name: the snapshot has no link to a half-written blob.
    assert not list((cache / "snapshots").rglob("*.pth"))
    hub.release.set()

    out = cli("pull", SPEC, env=hf_env)
    assert out.returncode == 0, out.stderr
    assert hub.gets()[-1].range == f"bytes={kept}-"
    assert Path(out.stdout.strip()).read_bytes() == hub.repos[REPO][FILE]
    assert "resuming" in out.stderr
    assert not list((cache / "blobs").glob("*.incomplete"))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (f"hf://{REPO}/missing.pth", "no file missing.pth"),
        # One CLI process each; one is enough for the README's command.
        pytest.param(f"hf://{REPO}/garbage.pth", "not a PyTorch checkpoint", marks=pytest.mark.slow),
        pytest.param("/models/local.pth", "pull takes a hub spec", marks=pytest.mark.slow),
    ],
)
def test_pull_errors_are_one_line(hub: FakeHub, hf_env: dict[str, str], spec: str, message: str) -> None:
    assert message in one_error_line(cli("pull", spec, env=hf_env))


@pytest.mark.slow  # the same messages as test_unreachable_hub_and_nothing_cached, through the CLI
def test_pull_without_network_or_cache(hf_env: dict[str, str]) -> None:
    env = {**hf_env, "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"}
    line = one_error_line(cli("pull", SPEC, env=env))
    assert "cannot reach" in line and "not in the hub cache" in line
    offline = one_error_line(cli("pull", SPEC, env={**hf_env, "HF_HUB_OFFLINE": "1"}))
    assert "HF_HUB_OFFLINE" in offline


def test_serve_errors_on_a_hub_model(hub: FakeHub, hf_env: dict[str, str], tmp_path: Path) -> None:
    out = cli("serve", "--model", f"hf://{REPO}/missing.pth", "--data-dir", str(tmp_path / "d"), env=hf_env)
    assert out.returncode == 2 and "no file missing.pth" in one_error_line(out)


@pytest.mark.slow
def test_serve_a_hub_model(hub: FakeHub, hf_env: dict[str, str], tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [*CLI, "serve", "--model", SPEC, "--data-dir", str(tmp_path / "data"), "--port", str(port)],
        env={**os.environ, **hf_env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        ready: dict[str, object] = {}
        while time.monotonic() < deadline and not ready:
            assert proc.poll() is None, "server exited early"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as resp:
                    ready = json.loads(resp.read())
            except OSError:
                time.sleep(0.2)
        assert ready.get("status") == "ready" and ready.get("demo_model") is False
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as resp:
            models = json.loads(resp.read())
        assert [m["id"] for m in models["data"]] == [Path(FILE).stem]
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "downloaded " + SPEC in err
