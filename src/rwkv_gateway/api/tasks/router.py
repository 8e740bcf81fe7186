"""The RWKV-Server Task API under /v1/tasks (docs/tasks.md): thin handlers over `services.tasks`.

Create, fim, fork and continue admit the generation on the engine before answering, so "busy" and
bad values are real statuses; the answer is a TaskResponse at once (the task generates in the
background) or, with `"stream": true`, an SSE stream of that generation: a prefill event, delta
`data` events, `data: [DONE]`. A client that drops such a stream stops the generation (nobody else
knows the task's id: the SDK does not hand it out). `GET {id}/stream?pos=N` attaches to a task from
piece N on; any number of subscribers may watch one task and dropping one stops nothing. The SDK
sends `{}` as the body of that GET, which is ignored like every body of a route that takes none.

When OpenAI API keys exist the routes need one (`Authorization: Bearer`), as /v1/* does; otherwise
they are open, as the SDK (which sends no auth) expects.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Body, Path, Query
from sse_starlette.sse import EventSourceResponse

from rwkv_gateway.api.common.deps import EngineDep, KeyDep, TasksDep
from rwkv_gateway.api.common.errors import ErrorRenderer, dialect_route
from rwkv_gateway.api.tasks.errors import TaskErrors
from rwkv_gateway.api.tasks.schemas import (
    TaskContinueRequest,
    TaskCreateRequest,
    TaskFimRequest,
    TaskListResponse,
    TaskResponse,
    TaskStatusResponse,
)
from rwkv_gateway.domain.constraints import OutputConstraint
from rwkv_gateway.domain.structured import grammar_constraint, one_constraint, response_format_constraint
from rwkv_gateway.services.tasks import GenParams, Prefilled, Task, TaskKind, TaskService, new_seed

_ERRORS = TaskErrors()
router = APIRouter(prefix="/v1/tasks", route_class=dialect_route(_ERRORS), tags=["tasks"])
TaskId = Annotated[str, Path(description="a TMP_, TASK_ or _TMPL_ id")]


def error_scopes() -> list[tuple[str, ErrorRenderer]]:
    """(path, renderer) pairs for errors raised outside this dialect's routes (404, 405, 500).

    A path ending in "/" is a prefix; any other path matches exactly. More specific entries first.
    """
    return [("/v1/tasks/", _ERRORS)]


# ---------------------------------------------------------------------------- wire shapes


def _dumps(payload: dict[str, Any]) -> str:
    # The reference's json.dumps defaults: ", " and ": " separators; text kept as UTF-8.
    return json.dumps(payload, ensure_ascii=False)


def task_response(task: Task) -> dict[str, Any]:
    body = TaskResponse(
        task_id=task.id,
        result=task.result,
        prefill_time=task.prefill_time,
        gen_time=task.gen_time,
        speed=task.speed,
        finished=task.finished,
    ).model_dump()
    if task.error:
        body["error"] = task.error  # beyond the reference: why a generation ended early
    return body


def _sse(events: AsyncIterator[str]) -> EventSourceResponse:
    # LF separators (`data: ...\n\n`); pings are SSE comments, which the SDK skips, so a long
    # queue or prefill never leaves the connection silent past the SDK's read timeout.
    return EventSourceResponse(events, sep="\n", ping=15, headers={"Cache-Control": "no-cache"})


async def _creator_events(service: TaskService, task: Task) -> AsyncIterator[str]:
    """The stream of a generation its caller asked to stream (create, fim, fork, continue)."""
    try:
        async for event in service.follow(task, 0):
            if isinstance(event, Prefilled):
                yield _dumps({"task_id": task.id, "prefill_time": event.prefill_time})
            else:
                yield _dumps(
                    {"data": event.text, "task_id": task.id, "gen_time": event.gen_time, "speed": event.speed}
                )
        if task.error:
            # No `data` key: the SDK skips it; other clients can see why the text ended.
            yield _dumps({"task_id": task.id, "error": task.error})
        yield "[DONE]"
    finally:
        if not task.finished:
            service.cancel_run(task)  # the client went away


async def _subscriber_events(service: TaskService, task: Task, pos: int) -> AsyncIterator[str]:
    async for event in service.follow(task, pos):
        if isinstance(event, Prefilled):
            yield _dumps({"task_id": task.id, "prefill_time": event.prefill_time})
        else:
            yield _dumps({"data": event.text})
    if task.error:
        yield _dumps({"task_id": task.id, "error": task.error})
    yield "[DONE]"


def _respond(service: TaskService, task: Task, stream: bool) -> dict[str, Any] | EventSourceResponse:
    if stream:
        return _sse(_creator_events(service, task))
    return task_response(task)


def _params(body: TaskCreateRequest | TaskFimRequest) -> GenParams:
    return GenParams(
        max_tokens=body.max_tokens,
        temperature=body.temperature,
        top_k=body.top_k,
        top_p=body.top_p,
        presence_penalty=body.presence_penalty,
        repetition_penalty=body.repetition_penalty,
        penalty_decay=body.penalty_decay,
        seed=new_seed() if body.seed is None else body.seed,
    )


def _constraint(body: TaskCreateRequest | TaskContinueRequest) -> OutputConstraint | None:
    """The generation's output constraint (docs/tasks.md#8-structured-output); bad values are 422s."""
    grammar = body.grammar
    return one_constraint(
        ("response_format", response_format_constraint(body.response_format)),
        ("grammar", None if grammar is None else grammar_constraint(grammar)),
    )


# ---------------------------------------------------------------------------- routes


@router.post("/tmp", response_model=None)
async def create_tmp(
    body: TaskCreateRequest, engine: EngineDep, tasks: TasksDep, key: KeyDep
) -> dict[str, Any] | EventSourceResponse:
    """A temporary task (`TMP_…`), evicted when idle. Generates from `prompt` (text or token ids)."""
    task = await tasks.create(
        engine, TaskKind.TMP, body.prompt, _params(body), api_key_id=key, constraint=_constraint(body)
    )
    return _respond(tasks, task, body.stream)


@router.post("/create", response_model=None)
async def create_persistent(
    body: TaskCreateRequest, engine: EngineDep, tasks: TasksDep, key: KeyDep
) -> dict[str, Any] | EventSourceResponse:
    """A persistent task (`TASK_…`): kept in the database and the state store across restarts.
    `max_tokens: 0` only builds the state of the prompt (the usual base of a template)."""
    task = await tasks.create(
        engine, TaskKind.TASK, body.prompt, _params(body), api_key_id=key, constraint=_constraint(body)
    )
    return _respond(tasks, task, body.stream)


@router.post("/fim", response_model=None)
async def fill_in_middle(
    body: TaskFimRequest, engine: EngineDep, tasks: TasksDep, key: KeyDep
) -> dict[str, Any] | EventSourceResponse:
    """Fill in the middle: a temporary task on `✿prefix✿✿suffix✿{suffix}✿middle✿{prefix}`."""
    task = await tasks.create(engine, TaskKind.TMP, body.prompt_text(), _params(body), api_key_id=key)
    return _respond(tasks, task, body.stream)


@router.get("/list")
async def list_tasks(tasks: TasksDep, _key: KeyDep) -> dict[str, Any]:
    """Tasks in RAM (`cpu_tasks`) and in the database (`db_tasks`: the 100 most recent)."""
    listing = await tasks.listing()
    return TaskListResponse(
        cpu_cache_count=len(listing.cpu_tasks),
        database_count=listing.database_count,
        total_count=listing.total_count,
        cpu_tasks=listing.cpu_tasks,
        db_tasks=listing.db_tasks,
    ).model_dump()


@router.get("/{task_id}/get_result")
async def get_result(task_id: TaskId, engine: EngineDep, tasks: TasksDep, _key: KeyDep) -> dict[str, Any]:
    """The text generated since the last re-prompt; `finished` once the generation has ended."""
    return task_response(await tasks.get(engine, task_id))


@router.get("/{task_id}/status")
async def get_status(task_id: TaskId, engine: EngineDep, tasks: TasksDep, _key: KeyDep) -> dict[str, Any]:
    """0 prefilling, 1 queued, 2 generating, 3 finished; `generated_buf` counts stream positions."""
    task = await tasks.get(engine, task_id)
    return TaskStatusResponse(
        task_id=task.id, generated_buf=len(task.pieces), status=int(task.status)
    ).model_dump()


@router.get("/{task_id}/stream")
async def stream_task(
    task_id: TaskId,
    engine: EngineDep,
    tasks: TasksDep,
    _key: KeyDep,
    pos: Annotated[int, Query(ge=0, description="stream position to start from")] = 0,
) -> EventSourceResponse:
    """Watch a task: its text from position `pos` at once, then live until it finishes."""
    task = await tasks.get(engine, task_id)
    return _sse(_subscriber_events(tasks, task, pos))


@router.post("/{task_id}/fork", response_model=None)
async def fork_task(
    task_id: TaskId,
    engine: EngineDep,
    tasks: TasksDep,
    key: KeyDep,
    body: Annotated[TaskContinueRequest | None, Body()] = None,
    tmp: Annotated[bool, Query(description="make the copy temporary (TMP_)")] = False,
) -> dict[str, Any] | EventSourceResponse:
    """A new task (`TASK_…`, or `TMP_…` with `tmp=true`) with a copy of the source's state, text and
    parameters, continued as `continue` would. The source is unchanged."""
    req = body or TaskContinueRequest()
    task = await tasks.fork(
        engine,
        task_id,
        tmp=tmp,
        prompt=req.prompt,
        overrides=req.overrides(),
        api_key_id=key,
        constraint=_constraint(req),
    )
    return _respond(tasks, task, req.stream)


@router.post("/{task_id}/continue", response_model=None)
async def continue_task(
    task_id: TaskId,
    engine: EngineDep,
    tasks: TasksDep,
    key: KeyDep,
    body: Annotated[TaskContinueRequest | None, Body()] = None,
) -> dict[str, Any] | EventSourceResponse:
    """Generate again on the same task: with `prompt`, prefill it on the state and start a new text;
    without, resume generating (another `max_tokens`) with the text kept."""
    req = body or TaskContinueRequest()
    task = await tasks.continue_(
        engine,
        task_id,
        prompt=req.prompt,
        overrides=req.overrides(),
        api_key_id=key,
        constraint=_constraint(req),
    )
    return _respond(tasks, task, req.stream)


@router.post("/{task_id}/stop")
async def stop_task(task_id: TaskId, engine: EngineDep, tasks: TasksDep, _key: KeyDep) -> dict[str, Any]:
    """End the generation at the next token; answers with the status once it has ended."""
    task = await tasks.stop(engine, task_id)
    return TaskStatusResponse(
        task_id=task.id, generated_buf=len(task.pieces), status=int(task.status)
    ).model_dump()


@router.post("/{task_id}/as_template", response_model=None)
async def as_template(task_id: TaskId, engine: EngineDep, tasks: TasksDep, _key: KeyDep) -> dict[str, Any]:
    """Freeze a copy of the task as a template (`_TMPL_…`), a base for forks; the source stays."""
    return task_response(await tasks.as_template(engine, task_id))


@router.post("/{task_id}/delete")
async def delete_task(
    task_id: TaskId,
    engine: EngineDep,
    tasks: TasksDep,
    _key: KeyDep,
    force: Annotated[bool, Query(description="needed to delete a template")] = False,
) -> dict[str, Any]:
    """Stop the task if it runs and remove it (with its saved state). Templates need `force=true`."""
    await tasks.delete(engine, task_id, force=force)
    return {"task_id": task_id, "deleted": True}
