"""What every backend does with live states of its model's fixed layout: zero states, snapshots in
and out, and the embedding row. Backends build one template state and inherit the rest from here.
"""

from __future__ import annotations

import torch

from rwkv_gateway.domain.engine import ModelInfo
from rwkv_gateway.engine.protocol import LiveState
from rwkv_gateway.engine.snapshot import StateLayout, StateSnapshot
from rwkv_gateway.errors import StateMismatch


class TemplateStates:
    """Mixin for backends: call `_set_template(zero_state)` once the model is loaded."""

    info: ModelInfo
    _template: LiveState
    _layout: StateLayout

    def _set_template(self, template: LiveState) -> None:
        self._template = template
        self._layout = StateLayout.of(template)

    @property
    def state_nbytes(self) -> int:
        return self._layout.numel * 4

    def zero_state(self) -> LiveState:
        return [t.clone() for t in self._template]

    def embedding(self, state: LiveState) -> list[float]:
        """The L2-normalised LayerNorm output that fed the last layer's channel mix for the last token.

        It is the deepest per-token hidden vector an RNN state keeps (every RWKV version stores it as
        the channel mix's token-shift row), so embeddings come from the same forward as generation.
        """
        per_layer = 5 if self.info.version == "4" else 3
        row = state[(self.info.n_layer - 1) * per_layer + per_layer - 1].detach().to("cpu", torch.float32)
        return torch.nn.functional.normalize(row.reshape(-1), dim=0).tolist()

    def capture(
        self, state: LiveState, token_count: int, logits: torch.Tensor | None = None
    ) -> StateSnapshot:
        return StateSnapshot.capture(
            state,
            model_id=self.info.model_id,
            version=self.info.version,
            token_count=token_count,
            logits=logits,
        )

    def restore(self, snap: StateSnapshot) -> LiveState:
        """A fresh live state with each tensor on the device and in the dtype the model uses: one
        host-to-device copy of the snapshot's buffer when the whole state is on one device."""
        snap.check_model(self.info.model_id)
        if snap.layout.shapes != self._layout.shapes:
            raise StateMismatch("state snapshot shapes do not match the loaded model")
        devices = {t.device for t in self._template}
        if len(devices) == 1:
            return snap.restore(devices.pop(), [t.dtype for t in self._template])
        # Layers split over devices (a v4-v6 strategy such as "cuda fp16 *10 -> cpu fp32"): a copy
        # per tensor, each to its own layer's device.
        return [
            piece.to(device=tmpl.device, dtype=tmpl.dtype, non_blocking=True, copy=True)
            for piece, tmpl in zip(snap.tensors(), self._template, strict=True)
        ]
