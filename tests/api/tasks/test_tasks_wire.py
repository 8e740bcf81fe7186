"""Task API wire format (docs/tasks.md): ids, TaskResponse and status shapes, the SSE framing, strict body
validation with FastAPI-style 422 details, every error status and body, and API keys."""

from __future__ import annotations

import json
from typing import Any

import pytest
from taskhelp import (
    GREEDY,
    TASK_ID,
    TASK_RESPONSE_KEYS,
    TMP_ID,
    TMPL_ID,
    Served,
    create,
    generate,
    sse_events,
    sse_payloads,
    wait_finished,
    wait_status,
)

from rwkv_gateway.services.tasks import TaskService

UNKNOWN = "TASK_" + "0" * 32

# ---------------------------------------------------------------------------- shapes


async def test_create_tmp_answers_at_once_with_a_task_response(served: Served) -> None:
    resp = await served.client.post(
        "/v1/tasks/tmp", json={"prompt": "Hello", "max_tokens": 6, "stream": False}
    )
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "application/json"
    body = resp.json()
    assert set(body) == TASK_RESPONSE_KEYS
    assert TMP_ID.fullmatch(body["task_id"])
    assert body["finished"] is False
    assert body["result"] == ""
    done = await wait_finished(served.client, body["task_id"])
    assert set(done) == TASK_RESPONSE_KEYS
    assert done["task_id"] == body["task_id"]
    assert done["result"] != ""
    assert all(isinstance(done[k], float) for k in ("prefill_time", "gen_time", "speed"))
    assert done["prefill_time"] > 0 and done["gen_time"] > 0 and done["speed"] > 0


async def test_create_persistent_and_fim_ids(served: Served) -> None:
    persistent = await created(served, "create", prompt="Hello", max_tokens=2)
    assert TASK_ID.fullmatch(persistent["task_id"]) and persistent["finished"] is False
    fim = await created(served, "fim", prefix="def add(a, b):\n    return ", suffix="\n", max_tokens=2)
    assert TMP_ID.fullmatch(fim["task_id"]) and fim["finished"] is False


async def created(served: Served, route: str, **body: Any) -> dict[str, Any]:
    resp = await served.client.post(f"/v1/tasks/{route}", json=body)
    assert resp.status_code == 200, resp.text
    result: dict[str, Any] = resp.json()
    return result


async def test_status_is_an_integer_and_counts_the_buffer(served: Served) -> None:
    task_id, result = await generate(served.client, prompt="Hello", max_tokens=7, **GREEDY)
    resp = await served.client.get(f"/v1/tasks/{task_id}/status")
    assert resp.json() == {"task_id": task_id, "generated_buf": 7, "status": 3}
    assert result


async def test_fim_prompt_is_the_reference_layout(served: Served) -> None:
    prefix, suffix = "def add(a, b):\n    return ", "\n    # end"
    _, fim = await generate(served.client, "fim", prefix=prefix, suffix=suffix, max_tokens=8, **GREEDY)
    layout = "✿prefix✿✿suffix✿" + suffix + "✿middle✿" + prefix
    _, plain = await generate(served.client, prompt=layout, max_tokens=8, **GREEDY)
    assert fim == plain


async def test_prompt_may_be_token_ids(served: Served) -> None:
    ids = served.app.state.services.model.engine.codec.encode("Hello there")
    _, by_ids = await generate(served.client, prompt=ids, max_tokens=6, **GREEDY)
    _, by_text = await generate(served.client, prompt="Hello there", max_tokens=6, **GREEDY)
    assert by_ids == by_text


async def test_max_tokens_zero_builds_a_state_without_generating(served: Served) -> None:
    task_id = await create(served.client, "create", prompt="Once upon a time", max_tokens=0)
    done = await wait_finished(served.client, task_id)
    assert done["result"] == "" and done["finished"] is True
    status = (await served.client.get(f"/v1/tasks/{task_id}/status")).json()
    assert status == {"task_id": task_id, "generated_buf": 0, "status": 3}
    # The state holds the prompt: continuing it is generating from the prompt.
    resp = await served.client.post(f"/v1/tasks/{task_id}/continue", json={"max_tokens": 6, **GREEDY})
    assert resp.status_code == 200 and resp.json()["finished"] is False
    continued = await wait_finished(served.client, task_id)
    _, fresh = await generate(served.client, prompt="Once upon a time", max_tokens=6, **GREEDY)
    assert continued["result"] == fresh


async def test_list_shape(served: Served) -> None:
    tmp = await create(served.client, prompt="a", max_tokens=1)
    persistent = await create(served.client, "create", prompt="b", max_tokens=1)
    await wait_finished(served.client, tmp)
    await wait_finished(served.client, persistent)
    resp = await served.client.get("/v1/tasks/list")
    assert resp.status_code == 200
    assert resp.json() == {
        "cpu_cache_count": 2,
        "database_count": 1,
        "total_count": 2,
        "cpu_tasks": [tmp, persistent],
        "db_tasks": [persistent],
    }


async def test_stop_answers_with_the_finished_status_and_delete_removes(served: Served) -> None:
    task_id = await create(served.client, prompt="Hello", max_tokens=4000)
    await wait_status(served.client, task_id, 2)
    resp = await served.client.post(f"/v1/tasks/{task_id}/stop", json={})
    assert resp.status_code == 200
    body = resp.json()
    assert set(body) == {"task_id", "generated_buf", "status"}
    assert body["task_id"] == task_id and body["status"] == 3
    assert 0 < body["generated_buf"] < 4000
    result = (await served.client.get(f"/v1/tasks/{task_id}/get_result")).json()
    assert result["finished"] is True
    resp = await served.client.post(f"/v1/tasks/{task_id}/delete?force=false", json={})
    assert resp.status_code == 200
    assert resp.json() == {"task_id": task_id, "deleted": True}
    assert (await served.client.get(f"/v1/tasks/{task_id}/get_result")).status_code == 404


# ---------------------------------------------------------------------------- SSE


async def test_create_stream_framing(served: Served) -> None:
    resp = await served.client.post(
        "/v1/tasks/tmp", json={"prompt": "def hello():\n    ", "max_tokens": 8, "stream": True, **GREEDY}
    )
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    assert resp.headers["cache-control"] == "no-cache"
    assert resp.headers["x-accel-buffering"] == "no"
    assert resp.headers["connection"] == "keep-alive"
    payloads = sse_payloads(resp.text)
    assert payloads[-1] == "[DONE]"
    events = [json.loads(p) for p in payloads[:-1]]
    first, deltas = events[0], events[1:]
    assert set(first) == {"task_id", "prefill_time"} and TMP_ID.fullmatch(first["task_id"])
    # The reference's json.dumps separators.
    assert payloads[0] == f'{{"task_id": "{first["task_id"]}", "prefill_time": {first["prefill_time"]!r}}}'
    assert deltas and all(set(d) == {"data", "task_id", "gen_time", "speed"} for d in deltas)
    assert {d["task_id"] for d in deltas} == {first["task_id"]}
    text = "".join(d["data"] for d in deltas)
    assert text == (await wait_finished(served.client, first["task_id"]))["result"]
    _, plain = await generate(served.client, prompt="def hello():\n    ", max_tokens=8, **GREEDY)
    assert text == plain


async def test_stream_of_a_finished_task_replays_at_once_and_tolerates_a_body(served: Served) -> None:
    task_id, result = await generate(served.client, prompt="Hello", max_tokens=6)
    resp = await served.client.request(
        "GET", f"/v1/tasks/{task_id}/stream", content=b"{}", headers={"content-type": "application/json"}
    )
    assert resp.status_code == 200
    events = sse_events(resp.text)
    assert set(events[0]) == {"task_id", "prefill_time"}
    assert events[1:] == [{"data": result}]


async def test_fork_and_continue_can_stream(served: Served) -> None:
    source, _ = await generate(served.client, "create", prompt="Hello", max_tokens=3, **GREEDY)
    forked = await served.client.post(
        f"/v1/tasks/{source}/fork", json={"prompt": " world", "max_tokens": 4, "stream": True}
    )
    events = sse_events(forked.text)
    fork_id = events[0]["task_id"]
    assert TASK_ID.fullmatch(fork_id) and fork_id != source
    text = "".join(e["data"] for e in events[1:])
    assert text == (await wait_finished(served.client, fork_id))["result"]
    continued = await served.client.post(
        f"/v1/tasks/{source}/continue", json={"max_tokens": 2, "stream": True}
    )
    events = sse_events(continued.text)
    assert {e["task_id"] for e in events} == {source}


# ---------------------------------------------------------------------------- validation


BAD_CREATE: list[tuple[dict[str, Any], str, str]] = [
    ({"max_tokens": -1}, "max_tokens", "greater_than_equal"),
    ({"max_tokens": 40961}, "max_tokens", "less_than_equal"),
    ({"max_tokens": "8"}, "max_tokens", "int_type"),
    ({"max_tokens": True}, "max_tokens", "int_type"),
    ({"max_tokens": 8.0}, "max_tokens", "int_type"),
    ({"temperature": 2.5}, "temperature", "less_than_equal"),
    ({"temperature": "1"}, "temperature", "float_type"),
    ({"top_k": -2}, "top_k", "greater_than_equal"),
    ({"top_k": 101}, "top_k", "less_than_equal"),
    ({"top_p": 1.01}, "top_p", "less_than_equal"),
    ({"presence_penalty": 10.5}, "presence_penalty", "less_than_equal"),
    ({"repetition_penalty": -0.1}, "repetition_penalty", "greater_than_equal"),
    ({"penalty_decay": 1.5}, "penalty_decay", "less_than_equal"),
    ({"stream": "true"}, "stream", "bool_type"),
    ({"stream": 1}, "stream", "bool_type"),
    ({"seed": "7"}, "seed", "int_type"),
    ({"bogus": 1}, "bogus", "extra_forbidden"),
]


@pytest.mark.parametrize(("change", "field", "error_type"), BAD_CREATE)
async def test_create_rejects_bad_fields_with_fastapi_details(
    served: Served, change: dict[str, Any], field: str, error_type: str
) -> None:
    resp = await served.client.post("/v1/tasks/tmp", json={"prompt": "Hello", **change})
    assert resp.status_code == 422
    detail = resp.json()["detail"]
    assert [(d["type"], d["loc"]) for d in detail] == [(error_type, ["body", field])]
    assert detail[0]["input"] == change[field]
    assert isinstance(detail[0]["msg"], str) and detail[0]["msg"]


async def test_create_accepts_range_ends_and_ints_for_floats(served: Served) -> None:
    body = {
        "prompt": "Hi",
        "max_tokens": 0,
        "temperature": 2,
        "top_k": -1,
        "top_p": 0,
        "presence_penalty": 10,
        "repetition_penalty": 10,
        "penalty_decay": 0,
        "seed": None,
    }
    assert (await served.client.post("/v1/tasks/tmp", json=body)).status_code == 200


async def test_prompt_rules(served: Served) -> None:
    async def detail(route: str, body: dict[str, Any]) -> list[tuple[str, list[Any]]]:
        resp = await served.client.post(route, json=body)
        assert resp.status_code == 422, resp.text
        return [(d["type"], d["loc"]) for d in resp.json()["detail"]]

    assert await detail("/v1/tasks/tmp", {"max_tokens": 1}) == [("missing", ["body", "prompt"])]
    assert await detail("/v1/tasks/create", {"prompt": None}) != []
    assert ("int_type", ["body", "prompt", "list[int]", 1]) in await detail(
        "/v1/tasks/tmp", {"prompt": [1, True]}
    )
    # Values only the engine can judge come back in the same shape.
    vocab = served.app.state.services.model.engine.info.vocab_size
    assert await detail("/v1/tasks/tmp", {"prompt": [vocab]}) == [("value_error", ["body", "prompt"])]
    assert await detail("/v1/tasks/tmp", {"prompt": ""}) == [("value_error", ["body", "prompt"])]


async def test_fim_rules(served: Served) -> None:
    resp = await served.client.post("/v1/tasks/fim", json={"prefix": "x", "max_tokens": 0})
    assert [(d["type"], d["loc"]) for d in resp.json()["detail"]] == [
        ("greater_than_equal", ["body", "max_tokens"])
    ]
    resp = await served.client.post("/v1/tasks/fim", json={"suffix": "x"})
    assert [(d["type"], d["loc"]) for d in resp.json()["detail"]] == [("missing", ["body", "prefix"])]
    resp = await served.client.post("/v1/tasks/fim", json={"prefix": "x", "prompt": "y"})
    assert [(d["type"], d["loc"]) for d in resp.json()["detail"]] == [("extra_forbidden", ["body", "prompt"])]


async def test_fork_and_continue_rules(served: Served) -> None:
    source, _ = await generate(served.client, "create", prompt="Hello", max_tokens=1)
    for route in ("fork", "continue"):
        resp = await served.client.post(f"/v1/tasks/{source}/{route}", json={"top_k": -1})
        assert resp.status_code == 422
        assert [(d["type"], d["loc"]) for d in resp.json()["detail"]] == [
            ("greater_than_equal", ["body", "top_k"])
        ]
        resp = await served.client.post(f"/v1/tasks/{source}/{route}", json={"max_tokens": 1, "extra": 0})
        assert resp.status_code == 422
    # No body at all is an empty body.
    resp = await served.client.post(f"/v1/tasks/{source}/fork")
    assert resp.status_code == 200 and TASK_ID.fullmatch(resp.json()["task_id"])


async def test_invalid_json_and_nan(served: Served) -> None:
    headers = {"content-type": "application/json"}
    resp = await served.client.post("/v1/tasks/tmp", content=b'{"prompt": ', headers=headers)
    assert resp.status_code == 422
    assert resp.json()["detail"][0]["type"] == "json_invalid"
    resp = await served.client.post(
        "/v1/tasks/tmp", content=b'{"prompt": "x", "temperature": NaN}', headers=headers
    )
    assert resp.status_code == 422
    assert [d["loc"] for d in resp.json()["detail"]] == [["body", "temperature"]]


async def test_query_rules(served: Served) -> None:
    task_id, _ = await generate(served.client, prompt="Hello", max_tokens=1)
    resp = await served.client.get(f"/v1/tasks/{task_id}/stream?pos=-1")
    assert resp.status_code == 422
    assert [(d["type"], d["loc"]) for d in resp.json()["detail"]] == [
        ("greater_than_equal", ["query", "pos"])
    ]


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize("task_id", [UNKNOWN, "TMP_" + "a" * 32, "_TMPL_" + "b" * 32, "nonsense", "TASK_XYZ"])
async def test_unknown_tasks_are_404_on_every_route(served: Served, task_id: str) -> None:
    client = served.client
    calls = [
        client.get(f"/v1/tasks/{task_id}/get_result"),
        client.get(f"/v1/tasks/{task_id}/status"),
        client.get(f"/v1/tasks/{task_id}/stream"),
        client.post(f"/v1/tasks/{task_id}/fork", json={}),
        client.post(f"/v1/tasks/{task_id}/continue", json={}),
        client.post(f"/v1/tasks/{task_id}/stop", json={}),
        client.post(f"/v1/tasks/{task_id}/as_template", json={}),
        client.post(f"/v1/tasks/{task_id}/delete?force=true", json={}),
    ]
    for call in calls:
        resp = await call
        assert (resp.status_code, resp.json()) == (404, {"detail": "Task not found"})


async def test_unknown_routes_and_methods_use_the_detail_shape(served: Served) -> None:
    resp = await served.client.get("/v1/tasks/nothing/here/at/all")
    assert (resp.status_code, resp.json()) == (404, {"detail": "Not Found"})
    resp = await served.client.get("/v1/tasks")
    assert (resp.status_code, resp.json()) == (404, {"detail": "Not Found"})
    resp = await served.client.get("/v1/tasks/tmp")
    assert (resp.status_code, resp.json()) == (405, {"detail": "Method Not Allowed"})
    assert resp.headers["allow"] == "POST"


async def test_template_rules(served: Served) -> None:
    source, _ = await generate(served.client, "create", prompt="Hello", max_tokens=2)
    resp = await served.client.post(f"/v1/tasks/{source}/as_template", json={})
    assert resp.status_code == 200
    template = resp.json()
    assert set(template) == TASK_RESPONSE_KEYS and TMPL_ID.fullmatch(template["task_id"])
    assert template["finished"] is True
    tid = template["task_id"]
    resp = await served.client.post(f"/v1/tasks/{tid}/as_template", json={})
    assert (resp.status_code, resp.json()) == (400, {"detail": "Task is already a template"})
    resp = await served.client.post(f"/v1/tasks/{tid}/continue", json={})
    assert (resp.status_code, resp.json()) == (
        400,
        {"detail": "Templates cannot be continued; fork them instead"},
    )
    resp = await served.client.post(f"/v1/tasks/{tid}/delete?force=false", json={})
    assert (resp.status_code, resp.json()) == (403, {"detail": "Cannot delete template without force=true"})
    resp = await served.client.post(f"/v1/tasks/{tid}/delete", json={})
    assert resp.status_code == 403
    resp = await served.client.post(f"/v1/tasks/{tid}/delete?force=true", json={})
    assert resp.status_code == 200
    assert (await served.client.get(f"/v1/tasks/{tid}/get_result")).status_code == 404


async def test_continue_while_running_is_409(served: Served) -> None:
    task_id = await create(served.client, prompt="Hello", max_tokens=4000)
    resp = await served.client.post(f"/v1/tasks/{task_id}/continue", json={"prompt": "x"})
    assert (resp.status_code, resp.json()) == (
        409,
        {"detail": "Task is still running; stop it or wait until it finishes"},
    )
    await served.client.post(f"/v1/tasks/{task_id}/stop", json={})


async def test_busy_engine_is_503_with_retry_after(serve: Any) -> None:
    served = await serve(queue_size=1, max_batch_size=1)
    running = await create(served.client, prompt="Hello", max_tokens=4000)
    await wait_status(served.client, running, 2)
    queued = await create(served.client, prompt="Hello", max_tokens=4000)
    resp = await served.client.post("/v1/tasks/tmp", json={"prompt": "Hello", "max_tokens": 5})
    assert resp.status_code == 503
    assert resp.json() == {"detail": "the request queue is full (1 waiting)"}
    assert resp.headers["retry-after"] == "1"
    assert (await served.client.get(f"/v1/tasks/{queued}/status")).json()["status"] == 0
    for task_id in (queued, running):
        await served.client.post(f"/v1/tasks/{task_id}/stop", json={})


async def test_oversized_body_is_413(serve: Any) -> None:
    served = await serve(max_body_bytes=1024)
    resp = await served.client.post("/v1/tasks/tmp", json={"prompt": "x" * 4096})
    assert resp.status_code == 413
    assert resp.json() == {"detail": "the request body is larger than 1024 bytes"}


async def test_unexpected_failures_are_500_details(served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    async def broken(self: TaskService, limit: int = 100) -> None:
        raise RuntimeError("injected")

    monkeypatch.setattr(TaskService, "listing", broken)
    resp = await served.client.get("/v1/tasks/list")
    assert (resp.status_code, resp.json()) == (500, {"detail": "internal server error"})


# ---------------------------------------------------------------------------- API keys


async def test_open_without_keys_and_keyed_once_a_key_exists(served: Served) -> None:
    assert (await served.client.get("/v1/tasks/list")).status_code == 200
    key = (await served.app.state.services.credentials.create("openai")).api_key
    served.app.state.services.openai_keys.forget()  # the 5 s cache of "are there keys?"
    resp = await served.client.get("/v1/tasks/list")
    assert resp.status_code == 401
    assert resp.json() == {"detail": "Missing API key: send 'Authorization: Bearer <key>'."}
    resp = await served.client.post(
        "/v1/tasks/tmp", json={"prompt": "Hi"}, headers={"authorization": "Bearer nope"}
    )
    assert (resp.status_code, resp.json()) == (401, {"detail": "Incorrect API key provided."})
    auth = {"authorization": f"Bearer {key}"}
    resp = await served.client.post("/v1/tasks/tmp", json={"prompt": "Hi", "max_tokens": 2}, headers=auth)
    assert resp.status_code == 200
    task_id = resp.json()["task_id"]
    assert (await served.client.get(f"/v1/tasks/{task_id}/status")).status_code == 401
    assert (await served.client.get(f"/v1/tasks/{task_id}/status", headers=auth)).status_code == 200
