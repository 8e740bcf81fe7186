"""The `rwkv-gateway` command as a user runs it: subprocesses, real files, a real server on a free port."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from rwkv_gateway.engine.loader import inspect_checkpoint
from support import free_port

CLI = [sys.executable, "-m", "rwkv_gateway"]


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, env=full_env, timeout=timeout, check=False
    )


def test_help_lists_the_commands() -> None:
    out = run_cli("--help")
    assert out.returncode == 0
    for command in ("serve", "demo-model", "db"):
        assert command in out.stdout


def test_demo_model_writes_a_loadable_checkpoint(tmp_path: Path) -> None:
    out = run_cli("demo-model", str(tmp_path / "m.pth"), "--arch", "v4", "--layers", "1", "--embd", "64")
    assert out.returncode == 0, out.stderr
    info = inspect_checkpoint(tmp_path / "m.pth")
    assert (info.version, info.n_layer, info.n_embd, info.vocab_size) == ("4", 1, 64, 65536)
    bad = run_cli("demo-model", str(tmp_path / "x.pth"), "--arch", "v9")
    assert bad.returncode != 0 and "v7 or v4" in bad.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "/nonexistent/model.pth"], "model file not found"),
        # Each case starts a server process; one is enough for the README's command.
        pytest.param(["--strategy", "gpu fp64"], "invalid strategy", marks=pytest.mark.slow),
        pytest.param(["--model", "GARBAGE"], "not a PyTorch checkpoint", marks=pytest.mark.slow),
        pytest.param(["--tokenizer", "GARBAGE"], "tokenizer", marks=pytest.mark.slow),
        pytest.param(["--port", "99999"], "port", marks=pytest.mark.slow),
    ],
)
def test_serve_errors_are_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00not a model" * 100)
    args = [str(garbage) if a == "GARBAGE" else a for a in args]
    out = run_cli("serve", "--data-dir", str(tmp_path / "data"), "--port", "0", *args)
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert errors == [lines[-1]] and message in errors[0]


def test_db_upgrade_uses_the_same_options_as_serve(tmp_path: Path) -> None:
    out = run_cli("db", "upgrade", "--data-dir", str(tmp_path / "a"))
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "a" / "gateway.db").exists()
    # The environment variable reaches the same database as the flag would.
    env_out = run_cli("db", "current", env={"RWKV_GATEWAY_DATA_DIR": str(tmp_path / "a")})
    assert env_out.returncode == 0
    assert env_out.stdout.strip() and "empty" not in env_out.stdout
    down = run_cli(
        "db", "downgrade", "base", "--db-url", f"sqlite+aiosqlite:///{tmp_path / 'a' / 'gateway.db'}"
    )
    assert down.returncode == 0, down.stderr
    assert "empty" in run_cli("db", "current", "--data-dir", str(tmp_path / "a")).stdout


def wait_ready(port: int, proc: subprocess.Popen[str], timeout: float = 120) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "server exited early"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as resp:
                body: dict[str, object] = json.loads(resp.read())
                return body
        except OSError:
            time.sleep(0.2)
    raise AssertionError("server never became ready")


def test_serve_demo_model_end_to_end(tmp_path: Path) -> None:
    port = free_port()
    data = tmp_path / "data"
    env = {
        **os.environ,
        "RWKV_GATEWAY_PORT": str(port),
        "RWKV_GATEWAY_DEMO_LAYERS": "1",
        "RWKV_GATEWAY_DEMO_EMBD": "64",
    }
    proc = subprocess.Popen(
        [*CLI, "serve", "--data-dir", str(data)],
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    try:
        ready = wait_ready(port, proc)
        assert ready["status"] == "ready" and ready["demo_model"] is True
        assert ready["rwkv_version"] == "7" and ready["strategy"] == "cpu fp32"
        assert ready["queue_depth"] == 0 and ready["active_sequences"] == 0
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as resp:
            assert json.loads(resp.read()) == {"status": "ok"}
        assert (data / "gateway.db").exists()
        assert list((data / "demo").glob("*.pth"))
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert "RANDOM-WEIGHT" in err and "noise" in err
    assert "loaded in" in err
