"""Where states live when the model is on a device: snapshots in host memory, live states on the device,
one copy each way. Proven on the CPU with the batched RWKV-7 backend's weights on torch's `meta` device
(shapes and dtypes, no data), which runs the same device code path as CUDA minus the arithmetic."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode

from rwkv_gateway.domain.engine import ModelInfo
from rwkv_gateway.engine.backend_batched_v7 import BatchedRwkv7Backend
from rwkv_gateway.engine.demo_model import make_demo_weights
from rwkv_gateway.engine.live_state import TemplateStates
from rwkv_gateway.engine.snapshot import StateSnapshot
from rwkv_gateway.engine.states import StateStore

VOCAB = 1024
N_LAYER, N_EMBD = 2, 128


def _target(args: Sequence[Any], kwargs: dict[str, Any]) -> str | None:
    """The device type a `Tensor.to` call names, if any."""
    for value in (*args[1:], kwargs.get("device")):
        if isinstance(value, str | torch.device):
            return torch.device(value).type
    return None


class DeviceCopies(TorchFunctionMode):
    """Counts copies between host memory and a device. A copy out of `meta` (which holds no data)
    leaves the host tensor as it is, so code under test can run its device-to-host path."""

    def __init__(self) -> None:
        super().__init__()
        self.to_device = 0
        self.to_host = 0

    def _count(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        if src.device.type == "cpu" and dst.device.type != "cpu":
            self.to_device += 1
        elif src.device.type != "cpu" and dst.device.type == "cpu":
            self.to_host += 1

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Sequence[type],
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func is torch.Tensor.copy_:
            dst, src = args[0], args[1]
            self._count(src, dst)
            if src.device.type == "meta":
                return dst
        if func is torch.Tensor.to and args[0].device.type == "meta" and _target(args, kwargs) == "cpu":
            self.to_host += 1
            return torch.empty(args[0].shape, dtype=args[0].dtype)
        out = func(*args, **kwargs)
        if func in (torch.Tensor.to, torch.Tensor.cpu, torch.Tensor.cuda) and isinstance(out, torch.Tensor):
            self._count(args[0], out)
        return out


@pytest.fixture(scope="module")
def meta_backend() -> BatchedRwkv7Backend:
    """The batched backend with fp16 weights on `meta`, as `BatchedRwkv7Backend.load` builds it for
    "cuda fp16" (fp16 token-shift rows, float32 WKV states)."""
    sd = make_demo_weights("v7", n_layer=N_LAYER, n_embd=N_EMBD, vocab_size=VOCAB, unsafe_ids=[0])
    info = ModelInfo(
        name="meta",
        path="meta.pth",
        model_id="meta-model",
        version="7",
        n_layer=N_LAYER,
        n_embd=N_EMBD,
        vocab_size=VOCAB,
        strategy="meta fp16",
        dtype="fp16",
        device="meta",
    )
    return BatchedRwkv7Backend._from_state_dict(sd, info, torch.device("meta"), torch.float16)


def forward_one(backend: BatchedRwkv7Backend) -> tuple[torch.Tensor, list[torch.Tensor]]:
    logits, states = backend.forward([[1, 2, 3], [4]], [None, None])
    assert logits.device.type == "meta"
    return logits[0], states[0]


def test_a_snapshot_of_a_device_state_lives_in_host_memory(meta_backend: BatchedRwkv7Backend) -> None:
    logits, state = forward_one(meta_backend)
    with DeviceCopies() as copies:
        snap = meta_backend.capture(state, 3, logits)
    assert snap.flat.device.type == "cpu" and snap.flat.dtype == torch.float32
    assert snap.logits is not None and snap.logits.device.type == "cpu" and snap.logits.shape == (VOCAB,)
    assert snap.device.type == "cpu"
    # State and logits come over together, in one copy.
    assert (copies.to_host, copies.to_device) == (1, 0)
    # The live state stays where the model is.
    assert all(t.device.type == "meta" for t in state)
    # No CUDA here, so no pinned memory: the snapshot holds exactly its values.
    assert not snap.flat.is_pinned()
    assert snap.nbytes == (snap.layout.numel + VOCAB) * 4


def test_the_state_cache_budget_counts_host_bytes(meta_backend: BatchedRwkv7Backend, tmp_path: Path) -> None:
    logits, state = forward_one(meta_backend)
    with DeviceCopies():
        snap = meta_backend.capture(state, 3, logits)
        one = snap.nbytes
        store = StateStore(tmp_path, budget_bytes=2 * one, model_id="meta-model")
        store.put("a", snap)
        # A snapshot that is on a device (load_snapshot can put one there) enters the cache as a host copy.
        on_device = StateSnapshot(
            snap.flat.to("meta"),
            snap.layout,
            "meta-model",
            "7",
            3,
            None if snap.logits is None else snap.logits.to("meta"),
        )
        store.put("b", on_device)
    for key in ("a", "b"):
        cached = store.get(key)
        assert cached is not None and cached.flat.device.type == "cpu"
        assert cached.logits is not None and cached.logits.device.type == "cpu"
    assert store.stats()["ram_bytes"] == 2 * one
    store.put("c", snap)  # over budget: the oldest goes
    assert store.stats()["ram_entries"] == 2 and "a" not in store


def test_restore_is_one_host_to_device_copy_per_state(meta_backend: BatchedRwkv7Backend) -> None:
    # Host snapshots as a capture, a state file or the CPU package backend leaves them.
    g = torch.Generator().manual_seed(3)
    snaps = [
        StateSnapshot.capture(
            [torch.randn(t.shape, generator=g).to(t.dtype) for t in meta_backend.zero_state()],
            model_id="meta-model",
            version="7",
            token_count=3,
        )
        for _ in range(3)
    ]
    with DeviceCopies() as copies:
        restored = [meta_backend.restore(s) for s in snaps]
    assert (copies.to_device, copies.to_host) == (3, 0)
    template = meta_backend.zero_state()
    for live in restored:
        assert [(t.device.type, t.dtype, t.shape) for t in live] == [
            (t.device.type, t.dtype, t.shape) for t in template
        ]
    # The restored states feed the device forward, together with a fresh one.
    out, new_states = meta_backend.forward([[5], [6], [7], [8]], [*restored, None])
    assert out.device.type == "meta" and len(new_states) == 4


class SplitModel(TemplateStates):
    """A model whose layers sit on two devices, as the rwkv package places them for a strategy such
    as "cuda fp16 *1 -> cpu fp32" (v4-v6 only); `meta` stands in for the GPU."""

    def __init__(self) -> None:
        self.info = ModelInfo(
            name="split",
            path="split.pth",
            model_id="split-model",
            version="5.2",
            n_layer=2,
            n_embd=8,
            vocab_size=VOCAB,
            strategy="meta fp16 *1 -> cpu fp32",
            dtype="fp16",
            device="meta",
        )
        self._set_template(
            [
                torch.zeros(8, dtype=torch.float16, device="meta"),
                torch.zeros((2, 4, 4), device="meta"),
                torch.zeros(8, dtype=torch.float16, device="meta"),
                torch.zeros(8),
                torch.zeros((2, 4, 4)),
                torch.zeros(8),
            ]
        )


def test_states_split_over_devices_capture_and_restore() -> None:
    model = SplitModel()
    with DeviceCopies() as copies:
        snap = model.capture(model.zero_state(), 1, torch.zeros(VOCAB, device="meta"))
        assert snap.device.type == "cpu" and copies.to_host == 4  # each device tensor on its own
        live = model.restore(snap)
    assert [(t.device.type, t.dtype) for t in live] == [(t.device.type, t.dtype) for t in model.zero_state()]
    assert not any(t.untyped_storage().data_ptr() == snap.flat.untyped_storage().data_ptr() for t in live)


def test_restored_states_share_no_memory_with_the_snapshot() -> None:
    state = [torch.randn(8).to(torch.float16), torch.randn(2, 4, 4), torch.randn(8)]
    snap = StateSnapshot.capture(state, model_id="m", version="7", token_count=1, logits=torch.randn(5))
    before = snap.flat.clone()
    live = snap.restore()
    assert [t.dtype for t in live] == [torch.float16, torch.float32, torch.float32]
    for t in live:
        t.add_(1.0)
    assert torch.equal(snap.flat, before)
    assert snap.logits is not None and snap.logits.shape == (5,)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_snapshots_are_pinned_and_round_trip(v7_path: Path) -> None:
    backend = BatchedRwkv7Backend.load(v7_path, "cuda fp16")
    logits, states = backend.forward([[1, 2, 3]], [None])
    snap = backend.capture(states[0], 3, logits[0])
    assert snap.flat.device.type == "cpu" and snap.flat.is_pinned()
    n = (snap.layout.numel + logits.shape[1]) * 4
    assert snap.nbytes == 1 << (n - 1).bit_length()  # the pinned allocator's power-of-two block
    live = backend.restore(snap)
    assert all(t.device.type == "cuda" for t in live)
    for got, want in zip(live, states[0], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    again, _ = backend.forward([[4]], [live])
    expected, _ = backend.forward([[4]], [states[0]])
    torch.testing.assert_close(again, expected, rtol=0, atol=0)


async def test_a_restored_snapshots_logits_go_where_the_model_is(
    meta_backend: BatchedRwkv7Backend, tmp_path: Path
) -> None:
    """A request that starts from a host snapshot with logits (a role-play reply, a prefix-cache hit)
    samples its first token from them in the same batch as the model's own device logits."""
    from rwkv_gateway.domain.types import GenerationRequest
    from rwkv_gateway.engine.scheduler import EngineConfig, Scheduler
    from rwkv_gateway.engine.tokenizer import load_tokenizer

    logits, state = forward_one(meta_backend)
    with DeviceCopies():
        snap = meta_backend.capture(state, 3, logits)
    assert snap.logits is not None and snap.logits.device.type == "cpu"
    scheduler = Scheduler(meta_backend, load_tokenizer(None), EngineConfig())  # decodes nothing here
    seq = await scheduler._prepare(GenerationRequest(initial_state=snap, max_tokens=4))
    with DeviceCopies() as copies:
        live = scheduler._initial_state(seq)
    assert live is not None and all(t.device.type == "meta" for t in live)
    assert seq.logits is not None and seq.logits.device.type == "meta"
    assert copies.to_device == 2  # the state's one copy, and the logits'
