"""Running tasks: admitting a task's next generation on the engine and consuming it in the background.

Each run is one engine request (`initial_state` = the task's snapshot, `return_state=True`), or a
chain of them when `max_tokens` exceeds the engine's per-request limit. Runs execute in background
asyncio tasks; generated text is appended to the task's piece list and every change wakes the
subscribers (`Task.notify`), so any number of streams can watch one task. When a run ends the task
holds its new state, and a persistent task is written back through the registry.
"""

from __future__ import annotations

import asyncio
import logging
import time

from rwkv_gateway.domain.constraints import OutputConstraint
from rwkv_gateway.domain.engine import Engine
from rwkv_gateway.domain.types import (
    Finish,
    FinishReason,
    GenerationRequest,
    Snapshot,
    TextDelta,
    Usage,
)
from rwkv_gateway.errors import GatewayError, InvalidParameter, ServerBusy
from rwkv_gateway.services.tasks.model import GenParams, Run, Task, TaskConfig, TaskStatus
from rwkv_gateway.services.tasks.registry import TaskRegistry

logger = logging.getLogger(__name__)

#: How long shutdown waits for running tasks to record their state.
_CLOSE_WAIT_S = 10.0


class TaskRunner:
    """Starts, drives and stops the runs of the registry's tasks (one per app)."""

    def __init__(self, registry: TaskRegistry, config: TaskConfig) -> None:
        self._registry = registry
        self.config = config
        self._closing = False

    async def close(self) -> None:
        """Refuse new runs, stop every run and wait (briefly) until each has recorded its state."""
        self._closing = True
        runners = []
        for task in self._registry.in_ram():
            self.cancel(task)
            if task.runner is not None:
                runners.append(task.runner)
        if runners:
            _, late = await asyncio.wait(runners, timeout=_CLOSE_WAIT_S)
            for runner in late:
                runner.cancel()
            if late:
                await asyncio.wait(late)

    @staticmethod
    def cancel(task: Task) -> None:
        """Ask the engine to end the task's generation (it does so at its next step)."""
        if task.run is not None:
            task.run.stop_requested = True
            task.run.stream.cancel()

    async def admit(
        self,
        engine: Engine,
        task: Task,
        prompt: str | list[int] | None,
        params: GenParams,
        *,
        api_key_id: str | None,
        constraint: OutputConstraint | None = None,
    ) -> None:
        """Admit the task's next generation on the engine (raising before anything changes); `launch`
        then runs it. A constrained generation is one engine request: a grammar cannot carry over to
        the next link of a chain (docs/tasks.md#8-structured-output)."""
        if self._closing:
            raise ServerBusy("the server is shutting down")
        new_tokens: list[int] = []
        if isinstance(prompt, str):
            new_tokens = await asyncio.to_thread(engine.codec.encode, prompt)
        elif prompt is not None:
            new_tokens = list(prompt)
        if prompt is not None and not new_tokens and task.state is None and not task.pending:
            raise InvalidParameter("the prompt is empty", param="prompt")
        state, pending = task.state, task.pending
        feed = [*pending, *new_tokens]
        clear = prompt is not None
        if params.max_tokens == 0 and not feed:
            # Nothing to prefill and nothing to generate: the task is finished as it is.
            self._begin(task, params, clear, TaskStatus.FINISHED)
            task.notify()
            return
        first = min(params.max_tokens, self.config.max_segment_tokens)
        request = self._request(state, feed, first, params, 0, api_key_id)
        request.constraint = constraint
        stream = await engine.submit(request)
        self._begin(task, params, clear, TaskStatus.PREFILL if feed else TaskStatus.READY)
        max_tokens = first if constraint is not None else params.max_tokens
        run = Run(base=state, fed=feed, stream=stream, max_tokens=max_tokens, api_key_id=api_key_id)
        task.run = run
        task.notify()

    def launch(self, engine: Engine, task: Task) -> None:
        """Start consuming the admitted run. Callers do this last, with no await before they answer,
        so the answer shows the task as admitted (never already finished) and the row is written."""
        if task.run is not None and task.runner is None:
            self._registry.keep_running(task)
            task.runner = asyncio.create_task(self._drive(engine, task, task.run), name=f"task-{task.id}")

    @staticmethod
    def _begin(task: Task, params: GenParams, clear: bool, status: TaskStatus) -> None:
        task.params = params
        task.status = status
        task.error = None
        task.prefill_time = 0.0
        if clear:
            task.pieces = []
            task.gen_time = 0.0
            task.generated = 0
            task.epoch += 1
        task.touch()

    @staticmethod
    def _request(
        state: Snapshot | None,
        feed: list[int],
        max_tokens: int,
        params: GenParams,
        segment: int,
        api_key_id: str | None,
    ) -> GenerationRequest:
        return GenerationRequest(
            prompt_tokens=feed,
            initial_state=state,
            return_state=True,
            sampling=params.sampling(segment),
            max_tokens=max_tokens,
            dialect="tasks",
            api_key_id=api_key_id,
        )

    async def _drive(self, engine: Engine, task: Task, run: Run) -> None:
        """Consume the run's engine stream(s) into the task; record the outcome when it ends."""
        submitted = run.submitted
        gen_started: float | None = None
        gen_before = task.gen_time
        generated_before = task.generated
        try:
            while True:
                finish: Finish | None = None
                async for event in run.stream:
                    now = time.monotonic()
                    if isinstance(event, Finish):
                        finish = event  # always the last event
                        continue
                    if gen_started is None:
                        gen_started = now
                        task.prefill_time = now - submitted
                        task.status = TaskStatus.RUNNING
                    self._absorb(task, run, event)
                    task.gen_time = gen_before + (now - gen_started)
                    task.touch()
                    task.notify()
                now = time.monotonic()
                if gen_started is None:
                    gen_started = now
                    task.prefill_time = now - submitted
                task.gen_time = gen_before + (now - gen_started)
                if finish is None:  # pragma: no cover - every engine stream ends with a Finish
                    finish = Finish(FinishReason.ERROR, usage=Usage(), error="the stream ended early")
                run.done_tokens += finish.usage.completion_tokens
                task.generated = generated_before + run.done_tokens
                if finish.reason in (FinishReason.STOP, FinishReason.LENGTH) and finish.state is not None:
                    task.state, task.pending = finish.state, []
                    left = run.max_tokens - run.done_tokens
                    more = finish.reason is FinishReason.LENGTH and left > 0 and not run.stop_requested
                    if more and await self._next_segment(engine, task, run, finish.state, left):
                        continue
                else:
                    # Cancelled (stop, delete, shutdown), timed out or failed: the engine kept no state,
                    # so the tokens generated on top of the last snapshot are fed at the next run.
                    task.state, task.pending = run.base, [*run.fed, *run.generated_ids(engine.codec)]
                    if finish.reason is not FinishReason.CANCELLED:
                        task.error = finish.error or f"generation ended: {finish.reason.value}"
                        logger.warning("task %s: %s", task.id, task.error)
                break
        except asyncio.CancelledError:  # shutdown gave up waiting: keep what is known, then stop
            run.stream.cancel()
            task.state, task.pending = run.base, [*run.fed, *run.generated_ids(engine.codec)]
            raise
        except Exception:
            logger.exception("task %s failed", task.id)
            run.stream.cancel()
            task.state, task.pending = run.base, [*run.fed, *run.generated_ids(engine.codec)]
            task.error = "internal error"
        finally:
            task.status = TaskStatus.FINISHED
            task.run = None
            task.runner = None
            task.touch()
            task.notify()
        if task.kind.persistent and not task.deleted:
            await self._registry.save(engine, task)

    @staticmethod
    def _absorb(task: Task, run: Run, delta: TextDelta) -> None:
        run.ids.extend(delta.token_ids)
        run.texts.append(delta.text)
        task.pieces.append(delta.text)
        task.generated += len(delta.token_ids)

    async def _next_segment(self, engine: Engine, task: Task, run: Run, state: Snapshot, left: int) -> bool:
        """Chain the next engine request of a run longer than the engine's max_tokens."""
        run.segment += 1
        request = self._request(
            state, [], min(left, self.config.max_segment_tokens), task.params, run.segment, run.api_key_id
        )
        while not run.stop_requested and not self._closing:
            try:
                run.stream = await engine.submit(request)
            except ServerBusy as exc:
                await asyncio.sleep(exc.retry_after)
                continue
            except GatewayError as exc:
                task.error = exc.message
                return False
            run.base, run.fed, run.ids, run.texts = state, [], [], []
            if run.stop_requested:  # stopped while this request was being admitted
                run.stream.cancel()
            return True
        return False
