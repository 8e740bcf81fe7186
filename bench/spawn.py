"""A gateway server of the benchmark's own: generate a checkpoint, run `rwkv-gateway serve` as a separate
process on a free port, wait for `/readyz`, stop it with SIGTERM (shared by the HTTP benchmarks)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CLI = [sys.executable, "-m", "rwkv_gateway"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def parse_shape(shape: str) -> tuple[int, int]:
    """`LAYERSxWIDTH` (e.g. 12x768) as two integers."""
    try:
        layers, embd = (int(x) for x in shape.lower().split("x"))
    except ValueError:
        raise SystemExit(f"a model shape is LAYERSxWIDTH such as 2x128, not {shape!r}") from None
    return layers, embd


def write_model(shape: str, folder: Path, *, newlines: bool = True) -> Path:
    """A random-weight, text-safe RWKV-7 checkpoint of this shape (the demo model's generator).

    `newlines=False`: the model never writes a token containing a newline either, so a reply that stops
    at a blank line (role-play) runs to its token limit, and N users stay N decoding rows to the end.
    """
    layers, embd = parse_shape(shape)
    model = folder / f"bench-v7-L{layers}-D{embd}{'' if newlines else '-nonl'}.pth"
    if model.exists():
        return model
    if newlines:
        demo = [*CLI, "demo-model", str(model), "--layers", str(layers), "--embd", str(embd)]
        subprocess.run(demo, check=True, stdout=subprocess.DEVNULL)
        return model
    from rwkv_gateway.engine.demo_model import default_unsafe_ids, write_demo_model
    from rwkv_gateway.engine.tokenizer import load_tokenizer

    tok = load_tokenizer(None)
    newline = [i for i in range(tok.vocab_size) if b"\n" in tok.token_bytes(i)]
    write_demo_model(model, n_layer=layers, n_embd=embd, unsafe_ids=default_unsafe_ids() + newline)
    return model


def wait_ready(url: str, proc: subprocess.Popen[bytes] | None, timeout: float) -> dict[str, Any]:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"the server exited with status {proc.returncode}")
        try:
            resp = httpx.get(f"{url}/readyz", timeout=5)
            if resp.status_code == 200:
                body: dict[str, Any] = resp.json()
                return body
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise SystemExit(f"{url} did not become ready within {timeout:.0f} s")


@dataclass
class Server:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid


@contextlib.contextmanager
def serve(model: Path, strategy: str, workdir: Path, env: dict[str, str]) -> Iterator[Server]:
    """`rwkv-gateway serve --model MODEL` on a free local port with extra `RWKV_GATEWAY_*` settings."""
    port = free_port()
    full_env = {**os.environ, "RWKV_GATEWAY_LOG_LEVEL": "warning", **env}
    command = [
        *CLI,
        "serve",
        "--model",
        str(model),
        "--strategy",
        strategy,
        "--data-dir",
        str(workdir / "data"),
        "--port",
        str(port),
    ]
    log_path = workdir / f"server-{port}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(command, env=full_env, stdout=log, stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}", proc, log_path)
    try:
        wait_ready(server.url, proc, timeout=300)
        yield server
    except BaseException:
        print(log_path.read_text(errors="replace")[-3000:], file=sys.stderr)
        raise
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
