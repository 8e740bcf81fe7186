"""Fixtures for models from a hub: a fake hub on a free port holding a generated checkpoint."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hub_server import FILE, REPO, FakeHub, serve_hub


@pytest.fixture
def hub(v7_path: Path) -> Iterator[FakeHub]:
    fake = FakeHub()
    fake.add(REPO, FILE, v7_path.read_bytes())
    fake.add(REPO, "garbage.pth", b"\x00not a checkpoint" * 1000)
    with serve_hub(fake):
        yield fake


@pytest.fixture
def hf_env(hub: FakeHub, tmp_path: Path) -> dict[str, str]:
    """What a subprocess needs to use the fake hub and a cache of its own."""
    return {
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_OFFLINE": "0",
        "HF_TOKEN": "",
    }
