"""Persistent tasks (`TASK_`) and templates (`_TMPL_`) survive a restart: the app is served twice on one
data directory, and the second run reads, continues and forks what the first one made (on SQLite and
on PostgreSQL)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.pool import NullPool
from taskhelp import (
    GREEDY,
    TMPL_ID,
    RestartFactory,
    Served,
    create,
    engine_tokens,
    eventually,
    generate,
    wait_finished,
    wait_status,
)

from rwkv_gateway.db.session import create_db_engine
from support.postgres import BOTH

DB_BACKENDS = BOTH
POSTGRESQL_SLOW = True  # the README's command stays under 5 minutes; CI runs these in the slow tier
PROMPT = "The lighthouse keeper"


async def task_rows(url: str) -> dict[str, tuple[Any, ...]]:
    engine = create_db_engine(url, poolclass=NullPool)
    try:
        async with engine.connect() as conn:
            result = await conn.execute(text("SELECT task_id, kind, result, state_key FROM tasks"))
            return {row[0]: tuple(row[1:]) for row in result}
    finally:
        await engine.dispose()


async def post(served: Served, path: str, **body: Any) -> dict[str, Any]:
    resp = await served.client.post(path, json=body)
    assert resp.status_code == 200, resp.text
    result: dict[str, Any] = resp.json()
    return result


async def test_tasks_and_templates_survive_a_restart(app_on: RestartFactory, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    async with app_on(data_dir) as first:
        client = first.client
        task_id, text = await generate(client, "create", prompt=PROMPT, max_tokens=5, **GREEDY)
        status = (await client.get(f"/v1/tasks/{task_id}/status")).json()
        template = (await post(first, f"/v1/tasks/{task_id}/as_template"))["task_id"]
        assert TMPL_ID.fullmatch(template)
        base, _ = await generate(client, "create", prompt=PROMPT, max_tokens=0, **GREEDY)
        base_template = (await post(first, f"/v1/tasks/{base}/as_template"))["task_id"]
        tmp_id, _ = await generate(client, prompt=PROMPT, max_tokens=1)
        gone, _ = await generate(client, "create", prompt="bye", max_tokens=1)
        await post(first, f"/v1/tasks/{gone}/delete")
        ids, _ = await engine_tokens(first, PROMPT, 5)
        codec = first.app.state.services.model.engine.codec
        fork_tokens = codec.encode(PROMPT) + ids + codec.encode(" said")
        _, expected_fork = await generate(client, prompt=fork_tokens, max_tokens=6, **GREEDY)
        _, expected_continue = await generate(client, prompt=PROMPT, max_tokens=9, **GREEDY)
        _, expected_base_fork = await generate(client, prompt=PROMPT + " said", max_tokens=6, **GREEDY)

    # What the database holds: metadata and text, the state itself in the state store.
    rows = await task_rows(first.settings.database_url)
    assert set(rows) == {task_id, template, base, base_template}
    assert rows[task_id] == ("task", text, f"task:{task_id}")
    assert rows[template] == ("template", text, f"task:{template}")

    async with app_on(data_dir) as second:
        client = second.client
        assert (await client.get(f"/v1/tasks/{task_id}/status")).json() == status
        for tid in (task_id, template):
            done = (await client.get(f"/v1/tasks/{tid}/get_result")).json()
            assert (done["task_id"], done["result"], done["finished"]) == (tid, text, True)
        listing = (await client.get("/v1/tasks/list")).json()
        assert listing["database_count"] == 4 and sorted(listing["db_tasks"]) == sorted(rows)
        for missing in (tmp_id, gone):
            assert (await client.get(f"/v1/tasks/{missing}/get_result")).status_code == 404
        # The states came back: forks and continues give what the first run would have given.
        fork = await post(second, f"/v1/tasks/{template}/fork", prompt=" said", max_tokens=6)
        assert (await wait_finished(client, fork["task_id"]))["result"] == expected_fork
        base_fork = await post(second, f"/v1/tasks/{base_template}/fork", prompt=" said", max_tokens=6)
        assert (await wait_finished(client, base_fork["task_id"]))["result"] == expected_base_fork
        await post(second, f"/v1/tasks/{task_id}/continue", max_tokens=4)
        assert (await wait_finished(client, task_id))["result"] == expected_continue
        # The stream positions of the saved text are the same pieces as before.
        resp = await client.get(f"/v1/tasks/{template}/stream?pos=2")
        pieces = (
            await second.app.state.services.tasks.get(second.app.state.services.model.engine, template)
        ).pieces
        assert len(pieces) == 5 and "".join(pieces) == text
        assert json.loads(resp.text.split("\n\n")[1][len("data: ") :]) == {"data": "".join(pieces[2:])}


async def test_a_stopped_task_resumes_after_a_restart(app_on: RestartFactory, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    async with app_on(data_dir) as first:
        task_id = await create(first.client, "create", prompt=PROMPT, max_tokens=4000, **GREEDY)
        await wait_status(first.client, task_id, 2)
        stopped = (await post(first, f"/v1/tasks/{task_id}/stop"))["generated_buf"]
        text = (await wait_finished(first.client, task_id))["result"]
    async with app_on(data_dir) as second:
        done = (await second.client.get(f"/v1/tasks/{task_id}/get_result")).json()
        assert done["result"] == text and done["finished"] is True
        await post(second, f"/v1/tasks/{task_id}/continue", max_tokens=3)
        after = await wait_finished(second.client, task_id)
        assert after["result"].startswith(text) and len(after["result"]) > len(text)
        status = (await second.client.get(f"/v1/tasks/{task_id}/status")).json()
        assert status["generated_buf"] == stopped + 3


async def test_a_task_running_at_shutdown_keeps_what_it_generated(
    app_on: RestartFactory, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    async with app_on(data_dir) as first:
        task_id = await create(first.client, "create", prompt=PROMPT, max_tokens=4000, **GREEDY)
        await wait_status(first.client, task_id, 2)
    async with app_on(data_dir) as second:
        done = (await second.client.get(f"/v1/tasks/{task_id}/get_result")).json()
        assert done["finished"] is True and done["result"] != ""
        await post(second, f"/v1/tasks/{task_id}/continue", max_tokens=2)
        after = await wait_finished(second.client, task_id)
        assert after["result"].startswith(done["result"])


async def test_a_template_made_by_another_model_cannot_be_continued(
    app_on: RestartFactory, tmp_path: Path, v4_path: Path
) -> None:
    data_dir = tmp_path / "data"
    async with app_on(data_dir) as first:
        base, _ = await generate(first.client, "create", prompt=PROMPT, max_tokens=2, **GREEDY)
        template = (await post(first, f"/v1/tasks/{base}/as_template"))["task_id"]
    async with app_on(data_dir, model=v4_path) as other:
        resp = await other.client.get(f"/v1/tasks/{template}/get_result")
        assert resp.status_code == 200 and resp.json()["finished"] is True
        resp = await other.client.post(f"/v1/tasks/{template}/fork", json={"prompt": "x"})
        assert (resp.status_code, resp.json()) == (
            409,
            {"detail": "The state of this task was lost (it was made by another model?)"},
        )


async def seen(served: Served, task_id: str, text: str) -> None:
    """Wait until `served` answers `text` for the task: another replica's run is saved just after it
    reports finished."""

    async def probe() -> bool:
        return bool((await wait_finished(served.client, task_id))["result"] == text)

    await eventually(probe)


async def test_another_replicas_continue_and_delete_are_seen(app_on: RestartFactory, tmp_path: Path) -> None:
    """Two apps on one database and one data directory, as two replicas behind a proxy: a persistent
    task each holds in RAM follows what the other did to it (docs/deployment.md)."""
    data_dir = tmp_path / "data"
    async with app_on(data_dir) as a, app_on(data_dir) as b:
        task_id, text = await generate(a.client, "create", prompt=PROMPT, max_tokens=5, **GREEDY)
        await seen(b, task_id, text)  # now in b's RAM too
        await post(a, f"/v1/tasks/{task_id}/continue", max_tokens=4)
        on_a = (await wait_finished(a.client, task_id))["result"]
        assert on_a.startswith(text) and on_a != text
        # b sees a's continuation and continues from a's state, not from its own stale copy.
        await seen(b, task_id, on_a)
        await post(b, f"/v1/tasks/{task_id}/continue", max_tokens=3)
        on_b = (await wait_finished(b.client, task_id))["result"]
        _, expected = await generate(a.client, prompt=PROMPT, max_tokens=12, **GREEDY)
        assert on_b == expected
        await seen(a, task_id, on_b)
        await post(b, f"/v1/tasks/{task_id}/delete")
        assert (await a.client.get(f"/v1/tasks/{task_id}/get_result")).status_code == 404
        # One replica alone keeps its objects: nothing is reloaded while no one else writes.
        services = a.app.state.services
        mine, _ = await generate(a.client, "create", prompt=PROMPT, max_tokens=2, **GREEDY)
        await wait_finished(a.client, mine)
        held = await eventually(lambda: _saved(services, mine))
        assert await services.tasks.get(services.model.engine, mine) is held


async def _saved(services: Any, task_id: str) -> Any:
    task = await services.tasks.get(services.model.engine, task_id)
    return task if task.saved_row is not None and task.saved_row.result == task.result else None
