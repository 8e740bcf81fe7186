"""Task lifecycle (docs/tasks.md#6-lifecycle): forks are independent copies, continue with and without
a prompt, seeds on fork and continue, stop, stream positions, several subscribers, eviction of
temporary tasks, runs longer than the engine's max_tokens."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from taskhelp import (
    GREEDY,
    TMP_ID,
    Served,
    create,
    engine_tokens,
    eventually,
    generate,
    sse_events,
    streamed_text,
    wait_finished,
    wait_status,
)

from support.postgres import BOTH

DB_BACKENDS = BOTH
POSTGRESQL_SLOW = True  # the engine-heavy flows; test_tasks_restart.py's run on PostgreSQL in the fast tier
PROMPT = "Once upon a time"


async def task_of(served: Served, task_id: str) -> Any:
    return await served.app.state.services.tasks.get(served.app.state.services.model.engine, task_id)


async def post(served: Served, path: str, **body: Any) -> dict[str, Any]:
    resp = await served.client.post(path, json=body)
    assert resp.status_code == 200, resp.text
    result: dict[str, Any] = resp.json()
    return result


async def test_fork_and_source_continue_like_a_fresh_task_fed_the_same_tokens(served: Served) -> None:
    client = served.client
    source, first = await generate(client, "create", prompt=PROMPT, max_tokens=6, **GREEDY)
    ids, text = await engine_tokens(served, PROMPT, 6)
    assert first == text
    codec = served.app.state.services.model.engine.codec
    fresh_tokens = codec.encode(PROMPT) + ids + codec.encode(" and then")
    _, fresh = await generate(client, prompt=fresh_tokens, max_tokens=8, **GREEDY)

    forks = [
        await post(served, f"/v1/tasks/{source}/fork", prompt=" and then", max_tokens=8) for _ in range(2)
    ]
    fork_results = [(await wait_finished(client, f["task_id"]))["result"] for f in forks]
    assert fork_results == [fresh, fresh]
    # The source is unchanged by its forks ...
    assert (await wait_finished(client, source))["result"] == first
    # ... and continuing it gives the same text again.
    await post(served, f"/v1/tasks/{source}/continue", prompt=" and then", max_tokens=8)
    assert (await wait_finished(client, source))["result"] == fresh
    # A fork of a fork is independent too: continuing the first fork does not touch the second.
    await post(served, f"/v1/tasks/{forks[0]['task_id']}/continue", prompt=" but", max_tokens=4)
    await wait_finished(client, forks[0]["task_id"])
    assert (await wait_finished(client, forks[1]["task_id"]))["result"] == fresh


async def test_forks_never_share_mutable_state(served: Served) -> None:
    source, _ = await generate(served.client, "create", prompt=PROMPT, max_tokens=0)
    fork = await post(served, f"/v1/tasks/{source}/fork?tmp=true", prompt=" there", max_tokens=3, **GREEDY)
    assert TMP_ID.fullmatch(fork["task_id"])
    await wait_finished(served.client, fork["task_id"])
    src, child = await task_of(served, source), await task_of(served, fork["task_id"])
    # The source still holds the snapshot of the prompt; the fork moved on to its own.
    assert src.state is not None and child.state is not None and src.state is not child.state
    assert src.state.token_count == len(served.app.state.services.model.engine.codec.encode(PROMPT))
    assert (
        child.state.token_count
        == src.state.token_count + len(served.app.state.services.model.engine.codec.encode(" there")) + 3
    )
    # Snapshots are immutable: a frozen dataclass; restoring one hands out new tensors.
    live = src.state.restore()
    live[0].add_(1.0)
    assert not (src.state.restore()[0] == live[0]).all()


async def test_continue_without_prompt_resumes_generation(served: Served) -> None:
    client = served.client
    task_id, first = await generate(client, prompt=PROMPT, max_tokens=5, **GREEDY)
    resp = await post(served, f"/v1/tasks/{task_id}/continue", max_tokens=5)
    assert resp["task_id"] == task_id and resp["finished"] is False
    assert resp["result"] == first  # the text is kept
    done = await wait_finished(client, task_id)
    _, straight = await generate(client, prompt=PROMPT, max_tokens=10, **GREEDY)
    assert done["result"] == straight and done["result"].startswith(first) and done["result"] != first
    status = (await client.get(f"/v1/tasks/{task_id}/status")).json()
    assert status == {"task_id": task_id, "generated_buf": 10, "status": 3}


async def test_continue_with_prompt_starts_a_new_text(served: Served) -> None:
    client = served.client
    task_id, _ = await generate(client, prompt=PROMPT, max_tokens=5, **GREEDY)
    resp = await post(served, f"/v1/tasks/{task_id}/continue", prompt="\nQ:", max_tokens=4)
    assert resp["finished"] is False and resp["result"] == ""
    done = await wait_finished(client, task_id)
    ids, _ = await engine_tokens(served, PROMPT, 5)
    codec = served.app.state.services.model.engine.codec
    _, fresh = await generate(
        client, prompt=codec.encode(PROMPT) + ids + codec.encode("\nQ:"), max_tokens=4, **GREEDY
    )
    assert done["result"] == fresh
    assert (await client.get(f"/v1/tasks/{task_id}/status")).json()["generated_buf"] == 4


async def test_given_parameters_replace_stored_ones(served: Served) -> None:
    task_id, _ = await generate(served.client, prompt=PROMPT, max_tokens=2, **GREEDY)
    await post(served, f"/v1/tasks/{task_id}/continue", max_tokens=3, top_p=0.5)
    await wait_finished(served.client, task_id)
    params = (await task_of(served, task_id)).params
    assert (params.max_tokens, params.top_p, params.temperature, params.presence_penalty) == (3, 0.5, 0, 0)


async def test_seed_on_create_fork_and_continue(served: Served) -> None:
    client = served.client
    sampled = {"temperature": 1.0, "top_p": 1.0, "top_k": 0}
    a = [(await generate(client, prompt=PROMPT, seed=7, max_tokens=12, **sampled))[1] for _ in range(2)]
    assert a[0] == a[1]
    source, _ = await generate(client, "create", prompt=PROMPT, max_tokens=0, **sampled)
    forks = []
    for seed in (11, 11, 12):
        fork = await post(served, f"/v1/tasks/{source}/fork", prompt=" x", seed=seed, max_tokens=12)
        forks.append((await wait_finished(client, fork["task_id"]))["result"])
    assert forks[0] == forks[1] and forks[0] != forks[2]
    continued = []
    for seed in (5, 5, 6):  # three tasks in the same state
        task_id, _ = await generate(client, "create", prompt=PROMPT, max_tokens=0, **sampled)
        await post(served, f"/v1/tasks/{task_id}/continue", prompt=" x", seed=seed, max_tokens=12)
        continued.append((await wait_finished(client, task_id))["result"])
    assert continued[0] == continued[1] and continued[0] != continued[2]
    assert (await task_of(served, task_id)).params.seed == 6


async def test_stop_keeps_the_text_and_continue_resumes_after_it(served: Served) -> None:
    client = served.client
    task_id = await create(client, "create", prompt=PROMPT, max_tokens=4000, **GREEDY)
    await wait_status(client, task_id, 2)
    stopped = (await post(served, f"/v1/tasks/{task_id}/stop"))["generated_buf"]
    before = (await wait_finished(client, task_id))["result"]
    assert stopped > 0 and before
    task = await task_of(served, task_id)
    # The engine keeps no state for a stopped request: the generated tokens wait to be fed.
    assert (
        task.state is None
        and len(task.pending) == len(served.app.state.services.model.engine.codec.encode(PROMPT)) + stopped
    )
    await post(served, f"/v1/tasks/{task_id}/continue", max_tokens=5)
    after = await wait_finished(client, task_id)
    assert after["result"].startswith(before) and len(after["result"]) > len(before)
    assert (await client.get(f"/v1/tasks/{task_id}/status")).json()["generated_buf"] == stopped + 5
    assert task.pending == [] and task.state is not None


async def test_stream_positions(served: Served) -> None:
    client = served.client
    task_id, result = await generate(client, prompt=PROMPT, max_tokens=9)
    pieces = (await task_of(served, task_id)).pieces
    assert len(pieces) == 9 and "".join(pieces) == result
    for pos in (0, 1, 4, 8):
        resp = await client.get(f"/v1/tasks/{task_id}/stream?pos={pos}")
        assert streamed_text(resp.text) == "".join(pieces[pos:])
    for pos in (9, 50):
        events = sse_events((await client.get(f"/v1/tasks/{task_id}/stream?pos={pos}")).text)
        assert [set(e) for e in events] == [{"task_id", "prefill_time"}]


async def test_resuming_a_running_task_from_a_position(served: Served) -> None:
    client = served.client
    task_id = await create(client, prompt=PROMPT, max_tokens=60)
    await wait_status(client, task_id, 2)
    resp = await client.get(f"/v1/tasks/{task_id}/stream?pos=3")
    pieces = (await task_of(served, task_id)).pieces
    assert len(pieces) == 60
    assert streamed_text(resp.text) == "".join(pieces[3:])


async def test_two_concurrent_subscribers_see_the_whole_text(served: Served) -> None:
    client = served.client
    creator = asyncio.ensure_future(
        client.post("/v1/tasks/tmp", json={"prompt": PROMPT, "max_tokens": 80, "stream": True})
    )

    async def running() -> list[str]:
        ids: list[str] = (await client.get("/v1/tasks/list")).json()["cpu_tasks"]
        return ids

    task_id = (await eventually(running))[0]
    assert (await client.get(f"/v1/tasks/{task_id}/status")).json()["status"] != 3
    first, second = await asyncio.gather(
        client.get(f"/v1/tasks/{task_id}/stream"), client.get(f"/v1/tasks/{task_id}/stream?pos=0")
    )
    creator_resp = await creator
    result = (await wait_finished(client, task_id))["result"]
    assert len((await task_of(served, task_id)).pieces) == 80
    for resp in (first, second, creator_resp):
        events = sse_events(resp.text)
        assert set(events[0]) == {"task_id", "prefill_time"}
        assert "".join(e["data"] for e in events[1:]) == result


async def test_temporary_tasks_are_evicted_by_count(serve: Any) -> None:
    served = await serve(task_tmp_max=2)
    ids = [(await generate(served.client, prompt="Hi", max_tokens=1))[0] for _ in range(3)]
    resp = await served.client.get(f"/v1/tasks/{ids[0]}/get_result")
    assert (resp.status_code, resp.json()) == (404, {"detail": "Task not found"})
    listing = (await served.client.get("/v1/tasks/list")).json()
    assert listing["cpu_tasks"] == ids[1:] and listing["total_count"] == 2


async def test_temporary_tasks_are_evicted_when_idle(serve: Any) -> None:
    served = await serve(task_tmp_idle_s=0.05, task_sweep_s=0.05)
    task_id, _ = await generate(served.client, prompt="Hi", max_tokens=1)

    async def evicted() -> bool:
        return not (await served.client.get("/v1/tasks/list")).json()["cpu_tasks"]

    await eventually(evicted)
    assert (await served.client.get(f"/v1/tasks/{task_id}/status")).status_code == 404


async def test_persistent_tasks_leave_ram_but_not_the_database(serve: Any) -> None:
    served = await serve(task_cache_size=1)
    first, text = await generate(served.client, "create", prompt=PROMPT, max_tokens=3, **GREEDY)
    second, _ = await generate(served.client, "create", prompt="Hi", max_tokens=1)

    async def listing_without_first() -> dict[str, Any] | None:
        body: dict[str, Any] = (await served.client.get("/v1/tasks/list")).json()
        return body if first not in body["cpu_tasks"] else None

    listing = await eventually(listing_without_first)  # once its row is written
    assert listing["cpu_tasks"] == [second]
    assert listing["database_count"] == 2 and listing["total_count"] == 2
    assert sorted(listing["db_tasks"]) == sorted([first, second])
    assert (await wait_finished(served.client, first))["result"] == text  # loaded back
    await post(served, f"/v1/tasks/{first}/continue", max_tokens=3)
    _, straight = await generate(served.client, prompt=PROMPT, max_tokens=6, **GREEDY)
    assert (await wait_finished(served.client, first))["result"] == straight


async def test_runs_longer_than_the_engine_limit_are_chained(serve: Any) -> None:
    limited = await serve(max_new_tokens=4)
    unlimited = await serve()
    task_id, chained = await generate(limited.client, prompt=PROMPT, max_tokens=10, **GREEDY)
    _, straight = await generate(unlimited.client, prompt=PROMPT, max_tokens=10, **GREEDY)
    assert chained == straight
    assert (await limited.client.get(f"/v1/tasks/{task_id}/status")).json()["generated_buf"] == 10


async def test_a_dropped_creator_stream_stops_the_generation(served: Served) -> None:
    from rwkv_gateway.api.tasks.router import _creator_events
    from rwkv_gateway.services.tasks import GenParams, TaskKind

    service, engine = served.app.state.services.tasks, served.app.state.services.model.engine
    task = await service.create(engine, TaskKind.TMP, PROMPT, GenParams(max_tokens=4000))
    events = _creator_events(service, task)
    assert set(json.loads(await anext(events))) == {"task_id", "prefill_time"}
    assert "data" in json.loads(await anext(events))
    await events.aclose()  # what sse-starlette does when the client goes away
    done = await wait_finished(served.client, task.id)
    assert done["finished"] is True and len(task.pieces) < 4000


async def test_a_dropped_subscriber_stops_nothing(served: Served) -> None:
    from rwkv_gateway.api.tasks.router import _subscriber_events

    service = served.app.state.services.tasks
    task_id = await create(served.client, prompt=PROMPT, max_tokens=40)
    task = await task_of(served, task_id)
    events = _subscriber_events(service, task, 0)
    await anext(events)
    await events.aclose()
    assert len((await wait_finished(served.client, task_id))["result"]) > 0 and len(task.pieces) == 40


async def test_status_one_while_waiting_to_generate_with_nothing_to_prefill(serve: Any) -> None:
    served = await serve(max_batch_size=1)
    client = served.client
    waiting, _ = await generate(client, prompt=PROMPT, max_tokens=2, **GREEDY)
    running = await create(client, prompt=PROMPT, max_tokens=4000)
    await wait_status(client, running, 2)
    await post(served, f"/v1/tasks/{waiting}/continue", max_tokens=2)
    assert (await client.get(f"/v1/tasks/{waiting}/status")).json()["status"] == 1
    await post(served, f"/v1/tasks/{running}/stop")
    done = await wait_finished(client, waiting)
    _, straight = await generate(client, prompt=PROMPT, max_tokens=4, **GREEDY)
    assert done["result"] == straight


async def test_tasks_share_the_engine_with_other_dialects(served: Served) -> None:
    client = served.client
    running = await create(client, prompt=PROMPT, max_tokens=4000)
    await wait_status(client, running, 2)
    resp = await client.post(
        "/v1/completions",
        json={"model": served.app.state.services.model.engine.info.name, "prompt": "Hi", "max_tokens": 3},
    )
    assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 3
    # The completion was generated in the same batches while the task kept running.
    assert (await client.get(f"/v1/tasks/{running}/status")).json()["status"] == 2
    assert served.app.state.services.model.engine.stats()["active_sequences"] == 1
    await post(served, f"/v1/tasks/{running}/stop")
