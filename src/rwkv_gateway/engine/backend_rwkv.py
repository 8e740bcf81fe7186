"""The `rwkv` package backend: the batch-shaped model interface, one sequence at a time underneath.

The package handles one sequence per call, so `forward` loops over the batch. It works for every
architecture the package supports (v4, v5.x, v6, v7). The package mutates the state list it is given
(and, with its CUDA kernels, the tensors themselves), so live states belong to exactly one sequence and
snapshots are copies (see `snapshot.py`).
"""

from __future__ import annotations

from typing import Any

import torch

from rwkv_gateway.domain.engine import ModelInfo
from rwkv_gateway.engine.live_state import TemplateStates
from rwkv_gateway.engine.protocol import LiveState, StatesConsumed


class RwkvPackageBackend(TemplateStates):
    """Advances sequences with the `rwkv` package's own forward (runs on the model thread only)."""

    def __init__(self, model: Any, info: ModelInfo, *, load_seconds: float = 0.0) -> None:
        self.model = model
        self.info = info
        self.load_seconds = load_seconds
        self._set_template(self._make_zero_state())

    def _make_zero_state(self) -> LiveState:
        if self.info.version == "7":
            return list(self.model.generate_zero_state())
        # The package builds v4/v5/v6 zero states inside forward(); feeding nothing is not possible,
        # so build the same tensors it would (per-layer device and dtype from its strategy plan).
        args = self.model.args
        version = float(self.model.version)
        state: LiveState = []
        for i in range(args.n_layer):
            dd = self.model.strategy[i]
            dev, atype = dd.device, dd.atype
            if version == 4:
                state += [
                    torch.zeros(args.n_embd, dtype=atype, device=dev),
                    torch.zeros(args.n_att, dtype=torch.float, device=dev),
                    torch.zeros(args.n_att, dtype=torch.float, device=dev),
                    torch.zeros(args.n_att, dtype=torch.float, device=dev) - 1e30,
                    torch.zeros(args.n_embd, dtype=atype, device=dev),
                ]
            else:
                n_head = args.n_head
                if getattr(args, "time_state", False):
                    kv = (
                        self.model.w[f"blocks.{i}.att.time_state"].transpose(1, 2).to(torch.float, device=dev)
                    )
                else:
                    kv = torch.zeros(
                        (n_head, args.n_att // n_head, args.n_att // n_head), dtype=torch.float, device=dev
                    )
                state += [
                    torch.zeros(args.n_embd, dtype=atype, device=dev),
                    kv.contiguous(),
                    torch.zeros(args.n_embd, dtype=atype, device=dev),
                ]
        return state

    def forward(
        self,
        token_lists: list[list[int]],
        states: list[LiveState | None],
        *,
        overwrite: bool = False,  # noqa: ARG002
    ) -> tuple[torch.Tensor, list[LiveState]]:
        """One package forward per sequence. The package writes every state it is given in place,
        whatever `overwrite` says, so a failure names the rows it had already written."""
        if len(token_lists) != len(states):
            raise ValueError("token_lists and states differ in length")
        if not all(token_lists):
            raise ValueError("every sequence in a batch needs at least one token")
        rows: list[torch.Tensor] = []
        out_states: list[LiveState] = []
        with torch.inference_mode():
            for i, (tokens, state) in enumerate(zip(token_lists, states, strict=True)):
                live = state if state is not None else self.zero_state()
                try:
                    logits, new_state = self.model.forward(list(tokens), live)
                except Exception as exc:
                    written = frozenset(r for r in range(i + 1) if states[r] is not None)
                    if written:
                        raise StatesConsumed(written, exc) from exc
                    raise
                rows.append(logits.float().reshape(-1))
                out_states.append(list(new_state))
        return torch.stack(rows), out_states
