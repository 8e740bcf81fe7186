"""Fixtures for the wenxinworkshop wire tests (helpers in wenxin_support.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from wenxin_support import Wenxin, make_wenxin

if TYPE_CHECKING:
    from tests.api.conftest import ServeFactory


@pytest.fixture
async def wx(serve: ServeFactory) -> Wenxin:
    return await make_wenxin(await serve())
