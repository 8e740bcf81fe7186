"""SamplingParams validation edge cases not covered by the sampler tests."""

from __future__ import annotations

import pytest

from rwkv_gateway.domain.types import SamplingParams
from rwkv_gateway.errors import InvalidParameter


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(top_k=True),  # type: ignore[arg-type]
        SamplingParams(seed=False),  # type: ignore[arg-type]
        SamplingParams(banned_tokens=frozenset({True})),  # type: ignore[arg-type]
        SamplingParams(logit_bias={1: float("inf")}),
        SamplingParams(penalty_decay=1.5),
        SamplingParams(mirostat_tau=-1.0),
    ],
)
def test_rejected(params: SamplingParams) -> None:
    with pytest.raises(InvalidParameter):
        params.validate(100)


def test_token_ids_checked_against_vocab() -> None:
    SamplingParams(banned_tokens=frozenset({99})).validate(100)
    with pytest.raises(InvalidParameter, match="banned token"):
        SamplingParams(banned_tokens=frozenset({100})).validate(100)
