"""The model thread owns every multi-threaded torch op (engine/threads.py)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from rwkv_gateway.engine import runtime
from rwkv_gateway.engine.demo_model import write_demo_model
from rwkv_gateway.engine.states import StateStore
from rwkv_gateway.engine.threads import helper_pool, model_thread, on_one_thread
from rwkv_gateway.settings import Settings


def _thread_report() -> tuple[int, str]:
    comm = Path(f"/proc/self/task/{threading.get_native_id()}/comm")
    return torch.get_num_threads(), comm.read_text().strip() if comm.exists() else ""


def test_model_thread_has_its_configured_threads_and_a_name() -> None:
    pool = model_thread(3)
    try:
        threads, name = pool.submit(_thread_report).result()
    finally:
        pool.shutdown()
    assert threads == 3
    if name:
        assert name == "rwkv-model"


def test_helpers_are_single_threaded() -> None:
    pool = helper_pool(2, "rwkv-sample")
    try:
        reports = [pool.submit(_thread_report).result() for _ in range(4)]
    finally:
        pool.shutdown()
    assert {threads for threads, _ in reports} == {1}


def test_on_one_thread_restores_the_callers_count() -> None:
    pool = model_thread(2)
    try:

        def inside_and_after() -> tuple[int, int]:
            with on_one_thread():
                inside = torch.get_num_threads()
            return inside, torch.get_num_threads()

        assert pool.submit(inside_and_after).result() == (1, 2)
    finally:
        pool.shutdown()


def test_state_files_are_read_and_written_single_threaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A service writes and reads state files on borrowed threads: their torch ops start no team there,
    and a read on the model thread leaves its thread count as it was."""
    import rwkv_gateway.engine.states as states

    seen: list[int] = []
    save, load = states.save_snapshot, states.load_snapshot

    def save_spy(*args: object, **kwargs: object) -> None:
        seen.append(torch.get_num_threads())
        save(*args, **kwargs)  # type: ignore[arg-type]

    def load_spy(*args: object, **kwargs: object) -> object:
        seen.append(torch.get_num_threads())
        return load(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(states, "save_snapshot", save_spy)
    monkeypatch.setattr(states, "load_snapshot", load_spy)
    model = tmp_path / "m.pth"
    write_demo_model(model, "v7", n_layer=1, n_embd=64, seed=0)
    loaded = runtime.load(Settings(model=model, data_dir=tmp_path / "data", torch_threads=2))
    assert loaded.thread is not None
    try:
        backend = loaded.backend
        store = StateStore(tmp_path / "states", budget_bytes=2**20, model_id=backend.info.model_id)
        snap = loaded.thread.submit(lambda: backend.capture(backend.zero_state(), 0, None)).result()
        store.put("k", snap, persist=True)
        store.clear_ram()

        def read_on_model_thread() -> int:
            assert store.get("k") is not None
            return torch.get_num_threads()

        assert loaded.thread.submit(read_on_model_thread).result() == 2
        assert seen == [1, 1]
    finally:
        loaded.thread.shutdown()


def test_the_scheduler_steps_on_the_thread_the_model_was_loaded_on(tmp_path: Path) -> None:
    model = tmp_path / "m.pth"
    write_demo_model(model, "v7", n_layer=1, n_embd=64, seed=0)
    settings = Settings(model=model, data_dir=tmp_path / "data", torch_threads=1, sample_threads=0)
    loaded = runtime.load(settings)
    engine = runtime.build_scheduler(settings, loaded)
    assert engine._executor is loaded.thread
    assert engine._sample_pool is None
    assert loaded.thread.submit(torch.get_num_threads).result() == 1
    loaded.thread.shutdown()
