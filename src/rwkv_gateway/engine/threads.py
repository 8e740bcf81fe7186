"""The engine's threads and torch's intra-op threads: one thread owns every multi-threaded torch op.

torch's CPU ops run on OpenMP (libgomp). Every thread that starts a parallel region gets a team of its
own, and as soon as the process holds more OpenMP threads than there are cores, libgomp stops letting
idle team members spin between regions (its "throttled" spin count): each of the few hundred parallel
regions of a forward then waits for a sleeping thread to be woken. Measured on a 2-core CPU, one
elementwise op run once on a second thread made every later 32-row decode forward of a 12x768 model
17-27% slower, for the life of the process (bench/README.md, "Where the time goes").

So the model thread (created here, with `RWKV_GATEWAY_TORCH_THREADS` intra-op threads; the default is
what torch picks for the machine: one per core) loads the model and runs every forward; the sampling
helpers and any thread that touches tensors on the side (state files read and written for services)
run their torch ops on one thread (`single_threaded`), which starts no team.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import torch

_PR_SET_NAME = 15


def default_torch_threads() -> int:
    """Intra-op threads of the model thread when not configured: torch's own choice (cores)."""
    return max(1, torch.get_num_threads())


def _name_thread(name: str) -> None:
    """Give the OS thread a name (`top -H`, /proc/PID/task/*/comm); best effort, Linux only."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass


def _set_threads(count: int) -> None:
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)


def _init_thread(name: str, torch_threads: int) -> None:
    _name_thread(name)
    _set_threads(torch_threads)


def model_thread(torch_threads: int | None = None) -> ThreadPoolExecutor:
    """The one thread that loads the model and runs every step, with `torch_threads` intra-op threads."""
    threads = torch_threads or default_torch_threads()
    return ThreadPoolExecutor(
        max_workers=1,
        thread_name_prefix="rwkv-model",
        initializer=partial(_init_thread, "rwkv-model", threads),
    )


def helper_pool(workers: int, name: str) -> ThreadPoolExecutor:
    """Threads that help the model thread with single-threaded torch work (sampling rows)."""
    return ThreadPoolExecutor(
        max_workers=workers, thread_name_prefix=name, initializer=partial(_init_thread, name, 1)
    )


def single_threaded() -> None:
    """Make the calling thread's torch ops single-threaded (it then never starts an OpenMP team)."""
    _set_threads(1)


@contextlib.contextmanager
def on_one_thread() -> Iterator[None]:
    """Run a block's torch ops single-threaded on the calling thread, restoring its count after."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
