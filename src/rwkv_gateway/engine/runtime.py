"""Building the engine from settings: pick the model (or write the demo one), tokenizer, loader, scheduler.

This is what the composition root calls (in a worker thread: loading takes seconds to minutes).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from rwkv_gateway.domain.types import RequestRecord
from rwkv_gateway.engine.backend_batched_v7 import BatchedRwkv7Backend
from rwkv_gateway.engine.demo_model import write_demo_model
from rwkv_gateway.engine.hub import is_hub_spec, resolve_model
from rwkv_gateway.engine.loader import inspect_checkpoint, load_model
from rwkv_gateway.engine.protocol import Backend
from rwkv_gateway.engine.scheduler import EngineConfig, Scheduler
from rwkv_gateway.engine.states import StateStore
from rwkv_gateway.engine.threads import model_thread
from rwkv_gateway.engine.tokenizer import Tokenizer, load_tokenizer
from rwkv_gateway.errors import ModelLoadError
from rwkv_gateway.settings import Settings

logger = logging.getLogger(__name__)

DEMO_WARNING = (
    "NO MODEL CONFIGURED: serving a small RANDOM-WEIGHT demo model (%s). Its output is noise. "
    "Start with --model /path/to/RWKV-x070-World-....pth to serve a real model."
)

#: The batched backend is plain torch: it has no kernels to build. Not an error, because one
#: configuration may serve models of several versions and the setting is right for the others.
CUDA_KERNELS_UNUSED = (
    "RWKV_GATEWAY_CUDA_KERNELS has no effect on this RWKV-7 model: the batched backend that serves it "
    "uses no custom kernels. The setting builds the rwkv package's kernels, for v4-v6 models or "
    "RWKV_GATEWAY_BACKEND=package"
)


@dataclass(slots=True)
class LoadedModel:
    backend: Backend
    tokenizer: Tokenizer
    #: The thread the model was loaded on, which runs every step after (engine/threads.py).
    thread: ThreadPoolExecutor | None = None


def resolve_model_path(settings: Settings) -> tuple[Path, bool]:
    """The checkpoint to serve and whether it is the demo model (written on first use). A hub spec is
    downloaded here when nothing did it before (`serve` does, before the server starts)."""
    if settings.model is not None:
        if is_hub_spec(settings.model):
            return resolve_model(settings.model), False
        return Path(settings.model), False
    path = settings.demo_model_path
    if not path.exists():
        write_demo_model(path, "v7", n_layer=settings.demo_layers, n_embd=settings.demo_embd, seed=0)
    return path, True


def load(settings: Settings) -> LoadedModel:
    """Load tokenizer and model as configured (blocking), on the model thread that will serve it: the
    load-time measurements then use that thread's torch threads, and no other thread starts a team."""
    thread = model_thread(settings.torch_threads)
    try:
        loaded = thread.submit(_load, settings).result()
    except BaseException:
        thread.shutdown(wait=False)
        raise
    loaded.thread = thread
    return loaded


def _load(settings: Settings) -> LoadedModel:
    path, is_demo = resolve_model_path(settings)
    if is_demo:
        logger.warning(DEMO_WARNING, path)
    info = inspect_checkpoint(path)
    tokenizer = load_tokenizer(settings.tokenizer, info.vocab_size)
    if tokenizer.vocab_size > info.vocab_size:
        raise ModelLoadError(
            f"tokenizer {tokenizer.name} has {tokenizer.vocab_size} tokens "
            f"but the model only {info.vocab_size}"
        )
    name = settings.model_name or ("rwkv-demo" if is_demo else None)
    use_batched = settings.backend == "batched" or (settings.backend == "auto" and info.version == "7")
    if settings.backend == "batched" and info.version != "7":
        raise ModelLoadError(f"the batched backend serves RWKV-7 only; this model is v{info.version}")
    if use_batched:
        if settings.cuda_kernels:
            logger.warning(CUDA_KERNELS_UNUSED)
        backend: Backend = BatchedRwkv7Backend.load(path, settings.strategy, name=name, is_demo=is_demo)
        return LoadedModel(backend=backend, tokenizer=tokenizer)
    backend = load_model(
        path,
        settings.strategy,
        jit=settings.jit,
        cuda_kernels=settings.cuda_kernels,
        name=name,
        is_demo=is_demo,
    )
    return LoadedModel(backend=backend, tokenizer=tokenizer)


def build_scheduler(
    settings: Settings, loaded: LoadedModel, *, on_finish: Callable[[RequestRecord], None] | None = None
) -> Scheduler:
    config = EngineConfig(
        queue_size=settings.queue_size,
        max_batch_size=settings.max_batch_size,
        prefill_chunk=settings.prefill_chunk,
        prefill_budget=settings.prefill_budget,
        request_timeout_s=settings.request_timeout_s,
        max_prompt_tokens=settings.max_prompt_tokens,
        max_new_tokens=settings.max_new_tokens,
        prefix_cache=settings.prefix_cache,
        live_state_bytes=settings.live_state_mb * 2**20,
        prefill_priority_s=settings.prefill_priority_s,
        torch_threads=settings.torch_threads,
        sample_threads=settings.sample_threads,
    )
    store = StateStore(
        settings.state_dir,
        budget_bytes=settings.state_cache_mb * 2**20,
        model_id=loaded.backend.info.model_id,
    )
    return Scheduler(
        loaded.backend, loaded.tokenizer, config, on_finish=on_finish, states=store, executor=loaded.thread
    )
