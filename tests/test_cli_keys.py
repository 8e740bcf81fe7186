"""`rwkv-gateway keys` as an operator runs it: subprocesses on a real data directory, flags and environment
variables reaching the same database, secrets printed once and never listed."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

CLI = [sys.executable, "-m", "rwkv_gateway"]


def run_cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    # Start from a clean slate so an operator's own RWKV_GATEWAY_* settings cannot leak into the test.
    base = {k: v for k, v in os.environ.items() if not k.startswith("RWKV_GATEWAY_")}
    return subprocess.run(
        [*CLI, *args],
        capture_output=True,
        text=True,
        env={**base, **(env or {})},
        cwd=cwd,
        timeout=120,
        check=False,
    )


def ok(out: subprocess.CompletedProcess[str]) -> str:
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    return out.stdout


def create(data: Path, kind: str, *extra: str) -> dict[str, str]:
    created: dict[str, str] = json.loads(
        ok(run_cli("keys", "create", "--kind", kind, "--json", "--data-dir", str(data), *extra))
    )
    return created


def listed(data: Path, *extra: str) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = json.loads(
        ok(run_cli("keys", "list", "--json", "--data-dir", str(data), *extra))
    )
    return rows


def test_help_lists_the_keys_commands() -> None:
    out = ok(run_cli("keys", "--help"))
    for command in ("create", "list", "revoke"):
        assert command in out


def test_create_json_prints_only_the_new_credential(tmp_path: Path) -> None:
    data = tmp_path / "data"
    openai = create(data, "openai", "--name", "laptop")
    assert set(openai) == {"api_key"}
    assert re.fullmatch(r"sk-rwkv-[A-Za-z0-9_-]{48}", openai["api_key"])
    baidu = create(data, "baidu")
    assert set(baidu) == {"api_key", "secret_key"}
    assert re.fullmatch(r"[a-z0-9]{24}", baidu["api_key"])
    assert re.fullmatch(r"[A-Za-z0-9]{32}", baidu["secret_key"])
    # The command migrated the database itself, in the data directory.
    assert (data / "gateway.db").exists()


def test_create_without_json_shows_the_key_once(tmp_path: Path) -> None:
    out = run_cli("keys", "create", "--kind", "baidu", "--name", "qianfan", "--data-dir", str(tmp_path))
    text = ok(out)
    assert "api_key:" in text and "secret_key:" in text and "qianfan" in text
    assert "cannot be shown again" in out.stderr


def test_list_shows_keys_without_secrets(tmp_path: Path) -> None:
    openai = create(tmp_path, "openai", "--name", "laptop")
    baidu = create(tmp_path, "baidu")
    rows = listed(tmp_path)
    assert [(r["kind"], r["key"], r["name"], r["revoked_at"]) for r in rows] == [
        ("openai", openai["api_key"][:12], "laptop", None),
        ("baidu", baidu["api_key"], "", None),
    ]
    assert [r["kind"] for r in listed(tmp_path, "--kind", "baidu")] == ["baidu"]
    table = ok(run_cli("keys", "list", "--data-dir", str(tmp_path)))
    for text in (json.dumps(rows), table):
        assert openai["api_key"] not in text
        assert baidu["secret_key"] not in text
    assert openai["api_key"][:12] in table and baidu["api_key"] in table and "laptop" in table


def test_revoke_by_key_id_and_prefix(tmp_path: Path) -> None:
    first = create(tmp_path, "openai")
    second = create(tmp_path, "openai")
    baidu = create(tmp_path, "baidu")
    ok(run_cli("keys", "revoke", first["api_key"], "--data-dir", str(tmp_path)))
    ok(run_cli("keys", "revoke", second["api_key"][:12], "--data-dir", str(tmp_path)))
    [remaining] = listed(tmp_path)
    assert remaining["key"] == baidu["api_key"]
    ok(run_cli("keys", "revoke", str(remaining["id"]), "--data-dir", str(tmp_path)))
    assert listed(tmp_path) == []
    everything = listed(tmp_path, "--all")
    assert len(everything) == 3 and all(r["revoked_at"] for r in everything)


@pytest.mark.parametrize(
    "identifier",
    # One CLI process each; one is enough for the README's command.
    [
        "sk-rwkv-nope",
        pytest.param("12345", marks=pytest.mark.slow),
        pytest.param("no-such-ak", marks=pytest.mark.slow),
    ],
)
def test_revoke_unknown_fails_with_one_line(tmp_path: Path, identifier: str) -> None:
    create(tmp_path, "openai")
    out = run_cli("keys", "revoke", identifier, "--data-dir", str(tmp_path))
    assert out.returncode == 1
    assert out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and identifier in lines[0]
    assert len(listed(tmp_path)) == 1


def test_bad_kind_is_a_usage_error(tmp_path: Path) -> None:
    out = run_cli("keys", "create", "--kind", "azure", "--data-dir", str(tmp_path))
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["error: --kind must be openai or baidu, not 'azure'"]


def test_env_var_reaches_the_same_database(tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = {"RWKV_GATEWAY_DATA_DIR": str(data)}
    created = json.loads(ok(run_cli("keys", "create", "--kind", "openai", "--json", env=env, cwd=tmp_path)))
    assert [r["key"] for r in listed(data)] == [created["api_key"][:12]]
    db_url = f"sqlite+aiosqlite:///{data / 'gateway.db'}"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    by_url = json.loads(ok(run_cli("keys", "list", "--json", "--db-url", db_url, cwd=elsewhere)))
    assert [r["key"] for r in by_url] == [created["api_key"][:12]]
    ok(run_cli("keys", "revoke", created["api_key"], env={"RWKV_GATEWAY_DB_URL": db_url}, cwd=elsewhere))
    assert listed(data) == []
    assert list(elsewhere.iterdir()) == []  # a --db-url run leaves the default data dir alone
