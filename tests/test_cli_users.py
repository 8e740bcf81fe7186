"""`rwkv-gateway users` as an operator runs it: subprocesses on a real data directory; the accounts
they make log in through the role-play API of a server on the same data directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx

from rwkv_gateway.app import create_app
from rwkv_gateway.settings import Settings

CLI = [sys.executable, "-m", "rwkv_gateway"]


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("RWKV_GATEWAY_")}
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, env=base, input=stdin, timeout=120, check=False
    )


def ok(out: subprocess.CompletedProcess[str]) -> str:
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    return out.stdout


def test_help_lists_the_users_commands() -> None:
    out = ok(run_cli("users", "--help"))
    for command in ("add", "list", "del", "import-legacy"):
        assert command in out
    assert "--ui-dir" in ok(run_cli("serve", "--help"))


async def test_add_list_login_delete(tmp_path: Path, v7_path: Path) -> None:
    data = tmp_path / "data"
    assert (
        ok(run_cli("users", "add", "sbin", "--password", "123456", "--data-dir", str(data)))
        == "added user sbin\n"
    )
    # Prompted (with confirmation) when --password is omitted.
    ok(run_cli("users", "add", "amy", "--data-dir", str(data), stdin="s3cret\ns3cret\n"))
    dup = run_cli("users", "add", "sbin", "--password", "x", "--data-dir", str(data))
    assert dup.returncode == 1 and "already exists" in dup.stderr
    bad = run_cli("users", "add", "../x", "--password", "x", "--data-dir", str(data))
    assert bad.returncode == 1 and "invalid user name" in bad.stderr
    rows = json.loads(ok(run_cli("users", "list", "--json", "--data-dir", str(data))))
    assert [(r["name"], r["characters"]) for r in rows] == [("amy", 0), ("sbin", 0)]

    app = create_app(Settings(model=v7_path, data_dir=data))
    async with app.router.lifespan_context(app):
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
        async with client:
            resp = await client.post("/login", data={"user_name": "amy", "password": "s3cret"})
            assert resp.json()["code"] == 200
            resp = await client.post("/login", data={"user_name": "sbin", "password": "1234567"})
            assert resp.json()["message"] == "密码不正确"
    # The password is stored as an Argon2id hash, never in clear.
    assert b"s3cret" not in (data / "gateway.db").read_bytes()

    assert ok(run_cli("users", "del", "amy", "--data-dir", str(data))) == "deleted user amy\n"
    missing = run_cli("users", "del", "amy", "--data-dir", str(data))
    assert missing.returncode == 1 and "no user" in missing.stderr
    rows = json.loads(ok(run_cli("users", "list", "--json", "--data-dir", str(data))))
    assert [r["name"] for r in rows] == ["sbin"]


def test_import_legacy(tmp_path: Path) -> None:
    legacy = tmp_path / "RWKV_Role_Playing_API"
    (legacy / "user").mkdir(parents=True)
    (legacy / "chars").mkdir()
    (legacy / "user" / "sbin").write_text("123456\r\n")
    (legacy / "user" / "..hidden").write_text("x")
    card = {"user": "哥哥", "bot": "小雪", "greeting": "你好", "bot_persona": "你扮演小雪。", "use_qa": False}
    (legacy / "chars" / "小雪.json").write_text(json.dumps(card, ensure_ascii=False))
    (legacy / "chars" / "broken.json").write_text("{")
    data = tmp_path / "data"
    out = ok(run_cli("users", "import-legacy", str(legacy), "--data-dir", str(data)))
    assert out == "imported 2 users (..hidden, sbin) and 2 characters\n"
    rows = json.loads(ok(run_cli("users", "list", "--json", "--data-dir", str(data))))
    assert [(r["name"], r["characters"]) for r in rows] == [("..hidden", 1), ("sbin", 1)]
