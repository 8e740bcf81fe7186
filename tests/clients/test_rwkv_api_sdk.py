"""The rwkv-api SDK's own test suite (46 tests) against a live rwkv-gateway on port 8000.

The suite is vendored unchanged from the `rwkv-api==0.1.2` sdist (MIT, see rwkv_api_suite/LICENSE)
under `rwkv_api_suite/tests`, which the main run does not collect. It hard-codes
`http://localhost:8000` and skips every integration test unless `GET /v1/models` answers, so the
`sdk_server` fixture (tests/clients/conftest.py) serves a generated RWKV-7 model on exactly that port
(a port still taken after two minutes fails the test, never skips it); this module runs the suite in a
pytest subprocess with the sdist's own pytest settings, and requires all 46 tests to pass (a skip
counts as a failure).
The model has 4 layers of width 256: the suite needs 500 tokens to take longer than half a second
(`test_wait_timeout`).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import httpx
import pytest

SUITE = Path(__file__).parent / "rwkv_api_suite" / "tests"
SDK_TESTS = 46
#: The sdist's [tool.pytest.ini_options], plus the loop scope pytest-asyncio asks to be set.
SUITE_INI = "[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n"


def test_vendored_suite_is_the_sdk_suite() -> None:
    names = sorted(p.name for p in SUITE.glob("*.py"))
    assert names == [
        "conftest.py",
        "test_client.py",
        "test_exceptions.py",
        "test_stream.py",
        "test_sync.py",
        "test_task.py",
    ]
    assert 'BASE_URL = "http://localhost:8000"' in (SUITE / "conftest.py").read_text(encoding="utf-8")


@pytest.mark.slow  # the vendored suite takes ~15 s; CI runs it after the README's command
def test_sdk_suite_passes(sdk_server: str, tmp_path: Path) -> None:
    models = httpx.get(f"{sdk_server}/v1/models", timeout=5)
    assert models.status_code == 200  # the suite skips everything otherwise
    # Run outside the repository, so neither our pytest settings nor our conftest files apply.
    shutil.copytree(SUITE, tmp_path / "tests")
    (tmp_path / "pytest.ini").write_text(SUITE_INI, encoding="utf-8")
    report = tmp_path / "report.xml"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-c",
            str(tmp_path / "pytest.ini"),
            "--rootdir",
            str(tmp_path),
            f"--junitxml={report}",
            str(tmp_path / "tests"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    output = done.stdout[-6000:] + done.stderr[-2000:]
    assert done.returncode == 0, output
    suite = ET.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    counts = {k: int(suite.get(k, "0")) for k in ("tests", "failures", "errors", "skipped")}
    assert counts == {"tests": SDK_TESTS, "failures": 0, "errors": 0, "skipped": 0}, output
