"""Where the migrations live and how they ship: `migrations/` at the repository root is what `alembic`
uses through `alembic.ini`, what the editable install maps onto `rwkv_gateway.migrations`, and what the
wheel carries inside the package, so an installed server migrates its database on start."""

from __future__ import annotations

import fnmatch
import os
import shutil
import sqlite3
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic.config import Config
from alembic.script import ScriptDirectory

import rwkv_gateway
from rwkv_gateway.db.migrate import head_revision, migrations_dir
from rwkv_gateway.db.models import Base

ROOT = Path(__file__).resolve().parent.parent
#: Where each package's files come from in the build (pyproject.toml's package-dir).
PACKAGE_ROOTS = {"rwkv_gateway": ROOT / "src/rwkv_gateway", "rwkv_gateway.migrations": ROOT / "migrations"}
#: What the build reads, as the Dockerfile copies it.
BUILD_INPUTS = ("pyproject.toml", "README.md", "src", "migrations")


def setuptools_config() -> dict[str, Any]:
    config: dict[str, Any] = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return config


def source_files(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and not path.name.endswith(".pyc"):
            yield path


def shipped_files() -> Iterator[tuple[str, Path]]:
    """(package, file) for every file the wheel should carry, the migrations under their mapped name."""
    for package_root, directory in PACKAGE_ROOTS.items():
        for path in source_files(directory):
            parts = path.relative_to(directory).parent.parts
            yield ".".join([package_root, *parts]), path


def test_alembic_ini_uses_the_top_level_migrations() -> None:
    scripts = ScriptDirectory.from_config(Config(str(ROOT / "alembic.ini")))
    assert Path(scripts.dir).resolve() == (ROOT / "migrations").resolve()
    assert scripts.get_current_head() == head_revision()


def test_the_program_finds_the_same_migrations() -> None:
    # The development install is editable: the package mapping points back at the repository.
    assert migrations_dir().resolve() == (ROOT / "migrations").resolve()
    assert not list(source_files(ROOT / "src" / "rwkv_gateway" / "migrations"))


def test_a_leftover_migrations_directory_in_src_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After the move, a checkout can keep src/rwkv_gateway/migrations alive through its __pycache__;
    the import system would take it for the package (a namespace one) before the editable mapping."""
    (tmp_path / "migrations" / "__pycache__").mkdir(parents=True)
    monkeypatch.setattr(rwkv_gateway, "__path__", [str(tmp_path), *rwkv_gateway.__path__])
    with pytest.raises(RuntimeError, match="older layout"):
        migrations_dir()


def test_the_build_ships_every_package_and_file() -> None:
    """`packages` is a list (setuptools' discovery cannot map a directory outside src/ into the
    package), so a new directory or data file must be added there; this keeps the list honest."""
    config = setuptools_config()
    assert config["package-dir"] == {"": "src", "rwkv_gateway.migrations": "migrations"}
    shipped = list(shipped_files())
    assert sorted(config["packages"]) == sorted({package for package, _ in shipped})
    assert {"rwkv_gateway.migrations", "rwkv_gateway.migrations.versions"} <= set(config["packages"])
    patterns = config["package-data"]
    for package, path in shipped:
        if path.suffix != ".py":
            assert any(fnmatch.fnmatch(path.name, p) for p in patterns.get(package, [])), path


def run(*command: str | Path, env: dict[str, str], cwd: Path) -> str:
    done = subprocess.run(
        [str(part) for part in command],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.mark.slow
def test_an_installed_wheel_migrates_a_database(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("RWKV_GATEWAY_")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    # Build from a clean copy of the build's inputs, so no stale build/ or egg-info can stand in for
    # the mapping; the venv's setuptools builds it, offline.
    source = tmp_path / "source"
    source.mkdir()
    for name in BUILD_INPUTS:
        if (ROOT / name).is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
            shutil.copytree(ROOT / name, source / name, ignore=ignore)
        else:
            shutil.copy2(ROOT / name, source / name)
    dist = tmp_path / "dist"
    pip = (sys.executable, "-m", "pip")
    offline = ("--no-deps", "--no-index")
    run(*pip, "wheel", *offline, "--no-build-isolation", "-w", dist, source, env=env, cwd=tmp_path)
    (wheel,) = dist.glob("rwkv_gateway-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        record = next(n for n in archive.namelist() if n.endswith(".dist-info/RECORD"))
        recorded = {line.split(",")[0] for line in archive.read(record).decode().splitlines()}
    for path in source_files(ROOT / "migrations"):
        assert f"rwkv_gateway/migrations/{path.relative_to(ROOT / 'migrations').as_posix()}" in recorded
    assert not any(name.startswith("migrations/") for name in recorded)

    # A fresh venv with only the wheel in it; the development venv lends it the dependencies (torch,
    # alembic, ...) through a path file behind its own site-packages, written after the install so
    # pip does not see the editable install there as the project already installed.
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, env=env, cwd=tmp_path)
    python = venv / "bin" / "python"
    run(*pip, "--python", python, "install", *offline, wheel, env=env, cwd=tmp_path)
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(run(python, "-c", code, env=env, cwd=tmp_path).strip())
    lent = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "_dev_dependencies.pth").write_text("".join(f"{p}\n" for p in sorted(lent)))

    code = "import rwkv_gateway.db.migrate as m; print(m.__file__); print(m.migrations_dir())"
    module, scripts = run(python, "-c", code, env=env, cwd=tmp_path).split()
    assert Path(module).is_relative_to(site) and Path(scripts) == site / "rwkv_gateway" / "migrations"

    db_file = tmp_path / "data" / "gateway.db"
    url = f"sqlite+aiosqlite:///{db_file}"
    out = run(venv / "bin" / "rwkv-gateway", "db", "upgrade", "--db-url", url, env=env, cwd=tmp_path)
    assert f"database at revision {head_revision()}" in out
    with sqlite3.connect(db_file) as connection:
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert tables == set(Base.metadata.tables) | {"alembic_version"}
