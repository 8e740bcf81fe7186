"""The deployment files: docker/Dockerfile (cpu and cuda targets), docker/compose.yaml and its GPU
overlay, the root .dockerignore and the container health probe.

The YAML-level checks always run (variables resolved to their defaults, the overlay merged the way
Compose merges files). When a Docker Compose v2 CLI is at hand (`docker compose`, or `docker-compose`
from the dev extras) the same checks run again on what `docker compose config` prints, so Compose
itself validates and normalises both files. No Docker engine is needed for any of it.
"""

from __future__ import annotations

import contextlib
import fnmatch
import http.server
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from rwkv_gateway.settings import Settings
from support import free_port

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
BASE = DOCKER / "compose.yaml"
GPU = DOCKER / "compose.gpu.yaml"
HEALTHCHECK = "/opt/rwkv-gateway/healthcheck.py"
HEX32_RE = re.compile(r"[0-9a-f]{32}")
#: huggingface_hub's variables for hf:// models, passed on from the shell or .env only when set there.
HUB_VARIABLES = {"HF_ENDPOINT", "HF_TOKEN", "HF_HUB_OFFLINE"}

# ---------------------------------------------------------------------------- compose helpers

_VAR = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable substitution (`${X}`, `${X:-default}`, `${X-default}`, `$$`) on every string."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group("name"), m.group("op"), m.group("arg") or ""
        current = env.get(name)
        if op == ":-":
            return current if current else arg
        if op == "-":
            return current if current is not None else arg
        if op in (":?", "?") and not current:
            raise AssertionError(f"{name} is required: {arg}")
        return current or ""

    return _VAR.sub(sub, value)


def merge(base: Any, overlay: Any) -> Any:
    """How Compose merges a later file into an earlier one: mappings key by key, anything else replaced."""
    if isinstance(base, dict) and isinstance(overlay, dict):
        out = dict(base)
        for key, value in overlay.items():
            out[key] = merge(base[key], value) if key in base else value
        return out
    return overlay


def load(*files: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for path in files:
        merged = merge(merged, yaml.safe_load(path.read_text()))
    return interpolate(merged, env or {})  # type: ignore[no-any-return]


def seconds(duration: str | int | float) -> float:
    """A Compose duration ("45s", "1m30s", "15m", "1h") in seconds."""
    if isinstance(duration, int | float):
        return float(duration)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"bad duration {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def volume_mounts(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """target -> {source, read_only, type}, from the short ("src:dst:ro") or the long syntax."""
    mounts: dict[str, dict[str, Any]] = {}
    for item in service["volumes"]:
        if isinstance(item, str):
            src, dst, *mode = item.split(":")
            kind = "bind" if src.startswith((".", "/", "~", "$")) else "volume"
            mounts[dst] = {"source": src, "read_only": "ro" in "".join(mode).split(","), "type": kind}
        else:
            mounts[item["target"]] = {
                "source": item["source"],
                "read_only": bool(item.get("read_only")),
                "type": item["type"],
            }
    return mounts


def published(service: dict[str, Any]) -> dict[int, tuple[str, str]]:
    """container port -> (host ip, host port)."""
    out: dict[int, tuple[str, str]] = {}
    for item in service["ports"]:
        if isinstance(item, str):
            *host, container = item.split(":")
            ip, port = (host[0], host[1]) if len(host) == 2 else ("", host[0])
            out[int(container)] = (ip, port)
        else:
            out[int(item["target"])] = (item.get("host_ip", ""), str(item["published"]))
    return out


def settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The Settings the server in the container builds from the service's environment."""
    for key in list(os.environ):
        if key.startswith("RWKV_GATEWAY_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return Settings(data_dir=Path("/data"))


# ---------------------------------------------------------------------------- checks on a config


def check_cpu_service(config: dict[str, Any], compose_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert set(config["services"]) == {"gateway"}
    svc = config["services"]["gateway"]
    build = svc["build"]
    assert build["target"] == "cpu"
    context = (compose_dir / build["context"]).resolve()
    assert context == ROOT
    assert (context / build["dockerfile"]).resolve() == DOCKER / "Dockerfile"
    # The API on 8000, published on loopback only unless the operator says otherwise.
    assert published(svc) == {8000: ("127.0.0.1", "8000")}
    mounts = volume_mounts(svc)
    assert mounts["/data"]["type"] == "volume" and not mounts["/data"]["read_only"]
    assert mounts["/data"]["source"] in config["volumes"] or any(
        v.get("name", "").endswith(mounts["/data"]["source"]) for v in config["volumes"].values()
    )
    assert mounts["/models"]["type"] == "bind" and mounts["/models"]["read_only"] is True
    health = svc["healthcheck"]
    assert health["test"] == ["CMD", "python3", HEALTHCHECK]
    assert seconds(health["start_period"]) >= 60
    assert seconds(health["interval"]) <= 30 and health["retries"] >= 2
    assert svc["init"] is True
    env = environment(svc)
    # Every variable is one the server knows: a typo would silently configure nothing.
    fields = {f"RWKV_GATEWAY_{name.upper()}" for name in Settings.model_fields}
    assert set(env) - HUB_VARIABLES <= fields, set(env) - HUB_VARIABLES - fields
    # No value, so unset in the container unless the shell sets them: an empty HF_ENDPOINT would be
    # taken as the hub's address.
    assert {name: svc["environment"][name] for name in HUB_VARIABLES} == dict.fromkeys(HUB_VARIABLES)
    settings = settings_from(env, monkeypatch)
    assert settings.model is None  # the demo model unless RWKV_GATEWAY_MODEL is set
    assert settings.strategy == "cpu fp32"
    assert settings.database_url == "sqlite+aiosqlite:////data/gateway.db"
    assert settings.log_format == "json"
    assert seconds(svc["stop_grace_period"]) >= settings.drain_timeout_s + 10


def check_gpu_service(config: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    svc = config["services"]["gateway"]
    assert svc["build"]["target"] == "cuda"
    assert svc["image"] == "rwkv-gateway:cuda"
    (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia"
    assert device["capabilities"] == ["gpu"]
    assert int(device["count"]) == 1
    settings = settings_from(environment(svc), monkeypatch)
    assert settings.strategy == "cuda fp16"
    # RWKV-7 runs on the batched backend, which has no kernels: none are built unless asked for.
    assert settings.cuda_kernels is False
    # Loading a large model takes minutes: no restart loop while it loads.
    assert seconds(svc["healthcheck"]["start_period"]) >= 600
    assert svc["healthcheck"]["test"] == ["CMD", "python3", HEALTHCHECK]
    assert seconds(svc["stop_grace_period"]) >= settings.drain_timeout_s + 10
    # What the overlay does not set comes from the base file.
    mounts = volume_mounts(svc)
    assert mounts["/models"]["read_only"] is True and mounts["/data"]["type"] == "volume"
    assert published(svc) == {8000: ("127.0.0.1", "8000")}


# ---------------------------------------------------------------------------- YAML level


def test_compose_file(monkeypatch: pytest.MonkeyPatch) -> None:
    check_cpu_service(load(BASE), DOCKER, monkeypatch)


def test_gpu_overlay_merges_onto_the_base(monkeypatch: pytest.MonkeyPatch) -> None:
    overlay = yaml.safe_load(GPU.read_text())
    # The overlay only adds: it names no build context, ports or volumes of its own.
    assert set(overlay["services"]["gateway"]) <= {
        "build",
        "image",
        "environment",
        "deploy",
        "healthcheck",
        "stop_grace_period",
    }
    check_gpu_service(load(BASE, GPU), monkeypatch)


def test_variables_override_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {
        "RWKV_GATEWAY_MODEL": "/models/RWKV-x070-World-2.9B.pth",
        "RWKV_GATEWAY_DB_URL": "postgresql+asyncpg://gw:pw@db/gw",
        "RWKV_GATEWAY_PUBLISH": "0.0.0.0:9000",
        "RWKV_MODELS_DIR": "/srv/models",
    }
    svc = load(BASE, GPU, env=env)["services"]["gateway"]
    settings = settings_from(environment(svc), monkeypatch)
    assert settings.model == "/models/RWKV-x070-World-2.9B.pth"
    assert settings.database_url == "postgresql+asyncpg://gw:pw@db/gw"
    assert published(svc) == {8000: ("0.0.0.0", "9000")}
    assert volume_mounts(svc)["/models"] == {"source": "/srv/models", "read_only": True, "type": "bind"}


def test_gpu_overlay_passes_the_kernel_setting_through(monkeypatch: pytest.MonkeyPatch) -> None:
    # A v4-v6 model on the rwkv package wants its kernels: the operator turns them on from the shell.
    svc = load(BASE, GPU, env={"RWKV_GATEWAY_CUDA_KERNELS": "true"})["services"]["gateway"]
    assert settings_from(environment(svc), monkeypatch).cuda_kernels is True


# ---------------------------------------------------------------------------- docker compose config


def compose_command() -> list[str] | None:
    """A Compose v2 CLI: the docker plugin, or a standalone `docker-compose` (the venv's first)."""
    candidates: list[list[str]] = []
    if shutil.which("docker"):
        candidates.append(["docker", "compose"])
    for where in (str(Path(sys.executable).parent), None):
        found = shutil.which("docker-compose", path=where)
        if found:
            candidates.append([found])
    for cmd in candidates:
        try:
            out = subprocess.run([*cmd, "version"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        # v1 (docker-compose 1.x, end of life) knows neither `name:` nor `config --format`.
        if out.returncode == 0 and re.search(r"version v?2\.", out.stdout):
            return cmd
    return None


@pytest.fixture(scope="module")
def compose() -> list[str]:
    cmd = compose_command()
    if cmd is None:
        pytest.skip("no Docker Compose v2 CLI (docker compose / docker-compose) on PATH")
    return cmd


def compose_config(cmd: list[str], *files: Path, cwd: Path, env: dict[str, str] | None = None) -> Any:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("RWKV_", "COMPOSE_", "DOCKER_", "HF_"))}
    args = [*cmd, *[a for f in files for a in ("-f", os.path.relpath(f, cwd))], "config", "--format", "json"]
    out = subprocess.run(
        args, cwd=cwd, env={**clean, **(env or {})}, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, f"{shlex.join(args)}: {out.stderr}"
    return json.loads(out.stdout)


def test_docker_compose_config_in_the_docker_dir(compose: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    config = compose_config(compose, BASE, cwd=DOCKER)
    assert config["name"] == "rwkv-gateway"
    check_cpu_service(config, DOCKER, monkeypatch)


def test_docker_compose_config_from_the_repo_root(
    compose: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Paths in the file are relative to the file, so the root gives the same project.
    config = compose_config(compose, BASE, cwd=ROOT)
    assert config["name"] == "rwkv-gateway"
    check_cpu_service(config, DOCKER, monkeypatch)
    assert volume_mounts(config["services"]["gateway"])["/models"]["source"] == str(DOCKER / "models")


def test_docker_compose_passes_the_hub_variables(compose: list[str]) -> None:
    env = {"HF_ENDPOINT": "https://hf-mirror.example", "HF_TOKEN": "hf_x", "HF_HUB_OFFLINE": "1"}
    config = compose_config(compose, BASE, GPU, cwd=DOCKER, env=env)
    assert {k: v for k, v in environment(config["services"]["gateway"]).items() if k in env} == env


def test_docker_compose_config_with_the_gpu_overlay(
    compose: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = compose_config(compose, BASE, GPU, cwd=DOCKER)
    check_gpu_service(config, monkeypatch)
    # Compose's own merge agrees with the YAML-level one.
    ours = load(BASE, GPU)["services"]["gateway"]
    theirs = config["services"]["gateway"]
    assert environment(theirs) == environment(ours)
    assert theirs["deploy"]["resources"] == ours["deploy"]["resources"]


# ---------------------------------------------------------------------------- Dockerfile


def dockerfile_stages() -> dict[str, dict[str, Any]]:
    """name -> {"from": image or stage, "lines": [(INSTRUCTION, args)]}, plus the global ARGs."""
    text = (DOCKER / "Dockerfile").read_text()
    logical: list[str] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        logical.append(buf + line)
        buf = ""
    stages: dict[str, dict[str, Any]] = {"": {"from": None, "lines": []}}
    current = ""
    for line in logical:
        instruction, _, args = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            m = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", args.strip(), re.IGNORECASE)
            assert m, f"every stage is named: {line}"
            current = m.group(2)
            assert current not in stages, f"duplicate stage {current}"
            stages[current] = {"from": m.group(1), "lines": []}
        else:
            stages[current]["lines"].append((instruction, args.strip()))
    return stages


def chain_of(stages: dict[str, dict[str, Any]], target: str) -> list[tuple[str, str]]:
    """Every instruction that makes up `target`, its base stages' first."""
    lines: list[tuple[str, str]] = []
    stage: str | None = target
    while stage in stages:
        lines = stages[stage]["lines"] + lines
        stage = stages[stage]["from"]
    return lines


def global_args(stages: dict[str, dict[str, Any]]) -> dict[str, str]:
    return dict(a.split("=", 1) for i, a in stages[""]["lines"] if i == "ARG" and "=" in a)


def env_of(lines: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction, args in lines:
        if instruction == "ENV":
            for token in shlex.split(args):
                key, _, value = token.partition("=")
                env[key] = value
    return env


def last(lines: list[tuple[str, str]], instruction: str) -> str:
    found = [a for i, a in lines if i == instruction]
    assert found, f"no {instruction}"
    return found[-1]


@pytest.mark.parametrize("target", ["cpu", "cuda"])
def test_dockerfile_runtime_target(target: str) -> None:
    stages = dockerfile_stages()
    assert target in stages
    lines = chain_of(stages, target)
    user = last(lines, "USER")
    assert user not in ("root", "0") and not user.startswith(("root:", "0:"))
    assert json.loads(last(lines, "VOLUME")) == ["/data"]
    assert last(lines, "EXPOSE") == "8000"
    env = env_of(lines)
    assert env["RWKV_GATEWAY_HOST"] == "0.0.0.0"
    assert env["RWKV_GATEWAY_PORT"] == "8000"
    assert env["RWKV_GATEWAY_DATA_DIR"] == "/data"
    assert "RWKV_GATEWAY_MODEL" not in env  # optional: the demo model without one
    assert env["HF_HOME"] == "/data/hf"  # hf:// downloads land in the volume and survive a restart
    health = last(lines, "HEALTHCHECK")
    options, _, command = health.partition(" CMD ")
    assert json.loads(command) == ["python3", HEALTHCHECK]
    period = re.search(r"--start-period=(\S+)", options)
    assert period and seconds(period.group(1)) >= (600 if target == "cuda" else 60)
    assert any(i == "COPY" and a.endswith(f"docker/healthcheck.py {HEALTHCHECK}") for i, a in lines)
    # Exec form: the server is PID 1's child-free process and gets SIGTERM itself.
    assert json.loads(last(lines, "CMD")) == ["rwkv-gateway", "serve"]
    assert "ENTRYPOINT" not in {i for i, _ in lines}
    assert not any("curl" in a or "wget" in a for _, a in lines)


def test_dockerfile_cpu_build_pins_the_cpu_torch() -> None:
    stages = dockerfile_stages()
    args = global_args(stages)
    assert args["TORCH_VERSION"] == "2.13.0"
    assert args["TORCH_CPU_INDEX"] == "https://download.pytorch.org/whl/cpu"
    build = chain_of(stages, "cpu-build")
    runs = [a for i, a in build if i == "RUN"]
    assert "pip install --index-url ${TORCH_CPU_INDEX} torch==${TORCH_VERSION}" in runs
    # torch before the project, so the project's `torch>=2.2` takes no other build.
    torch_at = runs.index("pip install --index-url ${TORCH_CPU_INDEX} torch==${TORCH_VERSION}")
    assert runs.index("pip install '.[postgres]'") > torch_at
    assert any(i == "COPY" and a.startswith("--from=cpu-build /opt/venv") for i, a in stages["cpu"]["lines"])
    assert stages["cpu-base"]["from"] == "${PYTHON_IMAGE}" and args["PYTHON_IMAGE"].startswith("python:3.1")


def test_dockerfile_cuda_build_can_compile_the_kernels() -> None:
    stages = dockerfile_stages()
    args = global_args(stages)
    assert re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-devel-ubuntu\d+\.\d+", args["CUDA_IMAGE"])
    # nvcc (the image) and torch's CUDA build name the same CUDA version.
    major, minor = re.findall(r"cuda:(\d+)\.(\d+)", args["CUDA_IMAGE"])[0]
    assert args["TORCH_CUDA_INDEX"] == f"https://download.pytorch.org/whl/cu{major}{minor}"
    runs = " ".join(a for i, a in chain_of(stages, "cuda-build") if i == "RUN")
    assert "torch==${TORCH_VERSION}" in runs and "--index-url ${TORCH_CUDA_INDEX}" in runs
    runtime = chain_of(stages, "cuda")
    apt = " ".join(a for i, a in runtime if i == "RUN")
    for package in ("build-essential", "ninja-build", "python3-dev"):
        assert package in apt
    assert env_of(runtime)["RWKV_GATEWAY_STRATEGY"] == "cuda fp16"
    # Compiled kernels land in the volume, so a restart does not compile them again.
    assert env_of(runtime)["TORCH_EXTENSIONS_DIR"].startswith("/data/")


def dockerignored(path: str) -> bool:
    """Whether the root .dockerignore keeps `path` out of the build context (last match wins)."""
    ignored = False
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatchcase(p, pattern) for p in prefixes) or (
            pattern.startswith("**/") and any(fnmatch.fnmatchcase(part, pattern[3:]) for part in parts)
        ):
            ignored = not negate
    return ignored


def test_dockerignore_sends_only_what_the_build_copies() -> None:
    copied = ["pyproject.toml", "README.md", "src/rwkv_gateway/app.py", "docker/healthcheck.py"]
    copied += ["migrations/env.py", "migrations/versions/0001_initial.py"]
    for path in copied:
        assert not dockerignored(path), path
    for path in (
        ".venv/bin/python",
        ".git/HEAD",
        "data/gateway.db",
        "docker/models/RWKV-x070.pth",
        "tests/conftest.py",
        ".env",
        "src/rwkv_gateway/__pycache__/app.cpython-311.pyc",
        "bench/results/engine.json",
    ):
        assert dockerignored(path), path
    # Everything the Dockerfile copies from the context exists.
    for instruction, args in chain_of(dockerfile_stages(), "cpu") + chain_of(
        dockerfile_stages(), "cpu-build"
    ):
        if instruction == "COPY" and not args.startswith("--from"):
            *sources, _dest = args.split()
            for source in sources:
                assert (ROOT / source).exists(), source


# ---------------------------------------------------------------------------- the health probe


@contextlib.contextmanager
def readyz_server(status: int) -> Iterator[int]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            code = status if self.path == "/readyz" else 404
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"status": "x"}')

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def probe(port: int) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ.get("PATH", ""), "RWKV_GATEWAY_PORT": str(port)}
    return subprocess.run(
        [sys.executable, str(DOCKER / "healthcheck.py")], env=env, capture_output=True, text=True, timeout=30
    )


def test_health_probe_follows_readyz() -> None:
    with readyz_server(200) as port:
        ok = probe(port)
    assert ok.returncode == 0 and ok.stdout.startswith("ready:"), ok
    with readyz_server(503) as port:
        loading = probe(port)
    assert loading.returncode == 1 and "answered 503" in loading.stdout, loading
    closed = free_port()  # nothing listens there
    down = probe(closed)
    assert down.returncode == 1 and down.stdout.startswith("unhealthy:"), down
    assert "Traceback" not in down.stderr


# ---------------------------------------------------------------------------- docs/deployment.md nginx


def deployment_nginx_blocks() -> list[str]:
    blocks = re.findall(r"```nginx\n(.*?)```", (ROOT / "docs" / "deployment.md").read_text(), re.S)
    assert len(blocks) == 2, "the proxy example and the scaling example"
    return blocks


@pytest.fixture
def nginx() -> str:
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        pytest.skip("nginx is not installed")
    return found


def nginx_conf(tmp: Path, body: str) -> Path:
    conf = tmp / "nginx.conf"
    conf.write_text(
        f"pid {tmp}/nginx.pid;\nerror_log {tmp}/error.log;\nevents {{}}\n"
        f"http {{\naccess_log off;\nclient_body_temp_path {tmp};\nproxy_temp_path {tmp};\n{body}\n}}\n"
    )
    return conf


def test_deployment_nginx_examples_are_valid(nginx: str, tmp_path: Path) -> None:
    proxy, scaling = deployment_nginx_blocks()
    proxy = proxy.replace("listen 443 ssl;", f"listen 127.0.0.1:{free_port()};")
    scaling += (
        f"\nserver {{ listen 127.0.0.1:{free_port()}; location / {{ proxy_pass http://rwkv_gateway; }} }}"
    )
    for i, body in enumerate((proxy, scaling)):
        where = tmp_path / str(i)
        where.mkdir()
        out = subprocess.run(
            [nginx, "-t", "-p", str(where), "-c", str(nginx_conf(where, body))],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.returncode == 0, out.stderr


def test_deployment_proxy_passes_what_signatures_cover(nginx: str, tmp_path: Path) -> None:
    """Through the proxy block of docs/deployment.md, a signed Baidu request reaches the upstream with
    its path, query, Host (port included), x-bce-date, Authorization and qianfan's Request_id
    unchanged."""
    seen: dict[str, Any] = {}

    class Echo(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            seen["path"] = self.path
            seen["headers"] = list(self.headers.items())
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    thread = threading.Thread(target=upstream.serve_forever, daemon=True)
    thread.start()
    listen = free_port()
    proxy = deployment_nginx_blocks()[0]
    proxy = proxy.replace("listen 443 ssl;", f"listen 127.0.0.1:{listen};")
    proxy = proxy.replace("server 127.0.0.1:8000;", f"server 127.0.0.1:{upstream.server_address[1]};")
    conf = nginx_conf(tmp_path, proxy)
    started = subprocess.run([nginx, "-p", str(tmp_path), "-c", str(conf)], capture_output=True, text=True)
    assert started.returncode == 0, started.stderr
    path = "/rpc/2.0/ai_custom/v1/wenxinworkshop/chat/rwkv?access_token=&foo=a%20b%2Fc"
    sent = [
        ("Host", "llm.example.com:8443"),
        ("Content-Type", "application/json"),
        ("x-bce-date", "2023-11-14T22:13:20Z"),
        ("Authorization", "bce-auth-v1/iam-ak/2023-11-14T22:13:20Z/1800/content-type;host;x-bce-date/b194"),
        ("Request_id", "sdk-py-0.4.12.3-AbCdEf0123456789"),
    ]
    try:
        with socket.create_connection(("127.0.0.1", listen), timeout=10) as sock:
            head = "".join(f"{k}: {v}\r\n" for k, v in sent)
            sock.sendall(
                f"POST {path} HTTP/1.1\r\n{head}Content-Length: 2\r\nConnection: close\r\n\r\n{{}}".encode()
            )
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
    finally:
        subprocess.run([nginx, "-p", str(tmp_path), "-c", str(conf), "-s", "stop"], capture_output=True)
        upstream.shutdown()
        upstream.server_close()
        thread.join()
    assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
    assert seen["path"] == path
    received = dict(seen["headers"])
    for name, value in sent:
        assert received[name] == value, name
    assert HEX32_RE.fullmatch(received["X-Request-Id"])  # made by the proxy when the client sent none
