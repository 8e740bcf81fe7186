"""Request logging off the hot path: finished generations are queued in memory and written in batches.

`RequestLogger.record()` never blocks and never touches the database; a background task collects
records until it has a full batch or 200 ms have passed since the batch's first record, then writes
them in one short transaction (a unit of work of its `Storage`). The queue is bounded so a stalled
database cannot grow memory without limit; a record that does not fit is dropped with a warning and
counted, and a batch that fails twice is logged with its size, so nothing is lost silently. Write
errors never stop the task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Sequence

from rwkv_gateway.domain.request_log_store import RequestLogUnit
from rwkv_gateway.domain.storage import Storage
from rwkv_gateway.domain.types import RequestRecord

logger = logging.getLogger(__name__)


class RequestLogger:
    """Batches `RequestRecord`s into the `request_log` table from one background task.

    `record()` may be called from any thread once started (calls from other threads are handed to
    the loop with `call_soon_threadsafe`); before `start()`, only from the loop's thread. `start()`
    launches the writer, `flush()` waits until everything recorded so far is written, `aclose()`
    writes what is pending and stops. Records made before `start()` wait in the queue; records made
    after `aclose()` are dropped with a warning.
    """

    def __init__(
        self,
        storage: Storage[RequestLogUnit],
        *,
        max_pending: int = 10_000,
        batch_size: int = 256,
        max_delay_s: float = 0.2,
        retry_delay_s: float = 0.5,
    ) -> None:
        if max_pending < 1 or batch_size < 1:
            raise ValueError("max_pending and batch_size must be >= 1")
        self._storage = storage
        self._batch_size = batch_size
        self._max_delay_s = max_delay_s
        self._retry_delay_s = retry_delay_s
        self._queue: asyncio.Queue[RequestRecord] = asyncio.Queue(maxsize=max_pending)
        #: Set by record() and flush() to wake a writer waiting for more records.
        self._wakeup = asyncio.Event()
        self._flushing = 0
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._closed = False
        self._overflowing = False
        self._dropped_unreported = 0
        #: Records dropped because the queue was full or the logger closed.
        self.dropped = 0
        #: Records lost because their batch could not be written even after a retry.
        self.failed = 0
        #: Records written.
        self.written = 0

    @property
    def pending(self) -> int:
        """Records waiting in the queue (not counting a batch being written)."""
        return self._queue.qsize()

    def record(self, rec: RequestRecord) -> None:
        """Queue one record for writing; returns at once."""
        loop = self._loop
        if loop is not None and threading.get_ident() != self._loop_thread:
            # asyncio.Queue is not thread-safe: hand records from other threads to the loop.
            try:
                loop.call_soon_threadsafe(self.record, rec)
            except RuntimeError:  # the loop is closed
                self.dropped += 1
                logger.warning("request log's event loop is closed; dropping record %s", rec.request_id)
            return
        if self._closed:
            self.dropped += 1
            logger.warning("request log is closed; dropping record %s", rec.request_id)
            return
        try:
            self._queue.put_nowait(rec)
        except asyncio.QueueFull:
            self.dropped += 1
            self._dropped_unreported += 1
            if not self._overflowing:
                # Warn once per overflow episode here; the writer reports the total when it drains.
                self._overflowing = True
                logger.warning(
                    "request log queue full (%s pending); dropping records until it drains",
                    self._queue.qsize(),
                )
            return
        # Wakes a writer holding a partial batch so it can take this record (and see a full batch).
        self._wakeup.set()

    async def start(self) -> None:
        """Launch the background writer on the running event loop."""
        if self._closed:
            raise RuntimeError("request logger is closed")
        if self._task is not None:
            raise RuntimeError("request logger already started")
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._task = asyncio.create_task(self._run(), name="request-log-writer")

    async def flush(self) -> None:
        """Return once every record queued before this call has been written (or reported lost)."""
        if not self._writer_running():
            await self._drain_inline()
            return
        self._flushing += 1
        self._wakeup.set()
        try:
            await self._queue.join()
        finally:
            self._flushing -= 1

    async def aclose(self) -> None:
        """Write everything pending, stop the writer and refuse further records. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            await self.flush()
        finally:
            task, self._task = self._task, None
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            self._report_overflow()
            if left := self._queue.qsize():
                # Only when the flush itself was interrupted (aclose cancelled or timed out).
                self.failed += left
                logger.warning("request log closed with %s records not written", left)

    def _writer_running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def _drain_inline(self) -> None:
        while not self._queue.empty():
            batch = [self._queue.get_nowait() for _ in range(min(self._batch_size, self._queue.qsize()))]
            try:
                await self._write(batch)
            finally:
                self._done(batch)
        self._report_overflow()

    async def _run(self) -> None:
        batch: list[RequestRecord] = []
        try:
            while True:
                await self._collect(batch)
                try:
                    await self._write(batch)
                except Exception:  # _write handles its own errors; this is the last line of defence
                    self.failed += len(batch)
                    logger.exception("request log writer: unexpected error; %s records lost", len(batch))
                self._done(batch)
                self._report_overflow()
        except asyncio.CancelledError:
            if batch:
                self.failed += len(batch)
                logger.warning("request log writer cancelled; %s records not written", len(batch))
                self._done(batch)
            raise

    async def _collect(self, batch: list[RequestRecord]) -> None:
        """Fill `batch`: wait for one record, then take more until full, the delay ends or a flush asks."""
        batch.append(await self._queue.get())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._max_delay_s
        while len(batch) < self._batch_size:
            with contextlib.suppress(asyncio.QueueEmpty):
                batch.append(self._queue.get_nowait())
                continue
            if self._flushing or loop.time() >= deadline:
                break
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(deadline):
                    await self._wakeup.wait()

    def _done(self, batch: list[RequestRecord]) -> None:
        for _ in batch:
            self._queue.task_done()
        batch.clear()

    async def _write(self, batch: Sequence[RequestRecord]) -> None:
        for attempt in (1, 2):
            try:
                async with self._storage.transaction() as uow:
                    await uow.request_log.add_many(batch)
                    await uow.commit()
            except Exception as exc:
                if attempt == 1:
                    logger.warning(
                        "writing %s request log records failed (%r); retrying once", len(batch), exc
                    )
                    await asyncio.sleep(self._retry_delay_s)
                    continue
                self.failed += len(batch)
                logger.exception("writing %s request log records failed twice; they are lost", len(batch))
                return
            self.written += len(batch)
            return

    def _report_overflow(self) -> None:
        if self._dropped_unreported:
            logger.warning(
                "request log dropped %s records because its queue was full", self._dropped_unreported
            )
            self._dropped_unreported = 0
        self._overflowing = False
