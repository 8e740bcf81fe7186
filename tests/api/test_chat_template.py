"""Which chat template the served model gets, as `/v1/models` and `/readyz` report it
(docs/chat-prompts.md#5-g-series-think-modes)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:  # the fixtures' types (conftest modules are not importable by name at run time)
    from conftest import ServeFactory


@pytest.mark.parametrize(
    ("choice", "expected"), [(None, "world"), ("g-series", "g-series"), ("world", "world")]
)
async def test_models_and_readyz_name_the_chat_template(
    serve: ServeFactory, choice: str | None, expected: str
) -> None:
    # The test checkpoint is tiny-v7.pth: auto gives World, the setting forces either.
    served = await serve(**({"chat_template": choice} if choice else {}))
    listed = (await served.client.get("/v1/models")).json()
    assert [m["chat_template"] for m in listed["data"]] == [expected]
    assert (await served.client.get(f"/v1/models/{served.model}")).json()["chat_template"] == expected
    assert (await served.client.get("/readyz")).json()["chat_template"] == expected
