"""A state saved to disk and reloaded continues exactly like the uninterrupted prefill."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rwkv_gateway.engine.backend_rwkv import RwkvPackageBackend
from rwkv_gateway.engine.states import StateStore
from rwkv_gateway.engine.tokenizer import Tokenizer
from rwkv_gateway.errors import StateMismatch


@pytest.mark.parametrize("fixture", ["v7_backend", "v4_backend"])
def test_prefill_a_then_b_from_disk_equals_a_plus_b(
    request: pytest.FixtureRequest, fixture: str, tokenizer: Tokenizer, tmp_path: Path
) -> None:
    backend: RwkvPackageBackend = request.getfixturevalue(fixture)
    a = tokenizer.encode("User: tell me about the moon\n\n")
    b = tokenizer.encode("Assistant: The moon is")
    whole, _ = backend.forward([a + b], [None])

    _, states = backend.forward([a], [None])
    snap = backend.capture(states[0], len(a))
    store = StateStore(tmp_path, budget_bytes=0, model_id=backend.info.model_id)
    store.put("conversation/1", snap, persist=True)
    reloaded = StateStore(tmp_path, budget_bytes=1 << 30, model_id=backend.info.model_id).get(
        "conversation/1"
    )
    assert reloaded is not None and reloaded.token_count == len(a)
    resumed, _ = backend.forward([b], [backend.restore(reloaded)])
    torch.testing.assert_close(resumed, whole, rtol=1e-4, atol=1e-4)


def test_snapshot_is_not_mutated_by_forward(v7_backend: RwkvPackageBackend) -> None:
    _, states = v7_backend.forward([[1, 2, 3]], [None])
    snap = v7_backend.capture(states[0], 3)
    before = snap.flat.clone()
    live = v7_backend.restore(snap)
    v7_backend.forward([[4, 5, 6]], [live])
    torch.testing.assert_close(snap.flat, before, rtol=0, atol=0)


def test_snapshot_from_another_model_is_refused(
    v7_backend: RwkvPackageBackend, v4_backend: RwkvPackageBackend
) -> None:
    _, states = v4_backend.forward([[1, 2]], [None])
    snap = v4_backend.capture(states[0], 2)
    with pytest.raises(StateMismatch, match="made by model"):
        v7_backend.restore(snap)
