"""SamplingParams validation edge cases not covered by the sampler tests; which finishes are failures."""

from __future__ import annotations

import pytest

from rwkv_gateway.domain.types import Finish, FinishReason, SamplingParams, Usage
from rwkv_gateway.errors import GenerationFailed, InvalidParameter, NotReady


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


@pytest.mark.parametrize("reason", [FinishReason.STOP, FinishReason.LENGTH, FinishReason.TIMEOUT])
def test_a_reply_is_no_failure_even_when_cut_by_the_request_timeout(reason: FinishReason) -> None:
    assert Finish(reason, Usage(), error="the request timed out").failure() is None


@pytest.mark.parametrize(
    ("finish", "error_class", "message"),
    [
        (Finish(FinishReason.ERROR, Usage(), error="NaN logits"), GenerationFailed, "NaN logits"),
        (Finish(FinishReason.ERROR, Usage()), GenerationFailed, "generation failed"),
        # The server ended it at shutdown: every dialect tells its client to retry.
        (
            Finish(FinishReason.CANCELLED, Usage(), error="server shutting down"),
            NotReady,
            "server shutting down",
        ),
        (Finish(FinishReason.CANCELLED, Usage()), NotReady, "the request was cancelled"),
    ],
)
def test_each_failed_finish_is_one_domain_error(finish: Finish, error_class: type, message: str) -> None:
    failure = finish.failure()
    assert type(failure) is error_class
    assert failure.message == message
