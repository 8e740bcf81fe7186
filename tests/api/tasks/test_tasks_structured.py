"""Structured output on the Task API (docs/tasks.md#8-structured-output): `response_format` and `grammar`
on create, fork and continue hold that generation to the format (the tiny noise model writes valid
JSON only through the grammar); bad values are FastAPI-style 422s; the constraint is not kept."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import jsonschema
import pytest
from taskhelp import Served, wait_finished

if TYPE_CHECKING:
    from conftest import ServeFactory

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "answer": {"enum": ["yes", "no", "不知道"]},
        "score": {"type": "integer", "minimum": 0, "maximum": 9},
        "words": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 2},
    },
    "required": ["answer", "score", "words"],
    "additionalProperties": False,
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": SCHEMA, "strict": True}}


async def result_of(served: Served, route: str, body: dict[str, Any]) -> str:
    resp = await served.client.post(route, json=body)
    assert resp.status_code == 200, resp.text
    done = await wait_finished(served.client, resp.json()["task_id"])
    assert "error" not in done, done
    result: str = done["result"]
    return result


@pytest.mark.parametrize("seed", range(3))
async def test_create_with_a_schema_gives_valid_json(served: Served, seed: int) -> None:
    body = {"prompt": "Verdict:", "max_tokens": 200, "seed": seed, "response_format": FORMAT}
    for route in ("/v1/tasks/tmp", "/v1/tasks/create"):
        jsonschema.validate(json.loads(await result_of(served, route, body)), SCHEMA)


async def test_a_grammar_and_json_object(served: Served) -> None:
    text = await result_of(
        served, "/v1/tasks/tmp", {"prompt": "Q:", "max_tokens": 20, "grammar": 'start: "yes" | "no"'}
    )
    assert text in ("yes", "no")
    body = {"prompt": "Q:", "max_tokens": 3, "seed": 1, "response_format": {"type": "json_object"}}
    assert (await result_of(served, "/v1/tasks/tmp", body)).startswith("{")


async def test_continue_and_fork_take_one_generation_each(served: Served) -> None:
    """The constraint covers the generation it came with; the next continue is free text again."""
    task = (await served.client.post("/v1/tasks/create", json={"prompt": "Q:", "max_tokens": 0})).json()[
        "task_id"
    ]
    await wait_finished(served.client, task)
    body = {"prompt": " Verdict:", "max_tokens": 200, "seed": 3, "response_format": FORMAT}
    resp = await served.client.post(f"/v1/tasks/{task}/continue", json=body)
    assert resp.status_code == 200, resp.text
    jsonschema.validate(json.loads((await wait_finished(served.client, task))["result"]), SCHEMA)
    fork = await served.client.post(
        f"/v1/tasks/{task}/fork", json={"max_tokens": 10, "grammar": 'start: "ok"'}
    )
    assert fork.status_code == 200, fork.text
    assert (await wait_finished(served.client, fork.json()["task_id"]))["result"].endswith("ok")
    await served.client.post(
        f"/v1/tasks/{task}/continue", json={"prompt": " More:", "max_tokens": 5, "seed": 4}
    )
    free = (await wait_finished(served.client, task))["result"]
    assert len(free) > 0  # unconstrained: whatever the noise model writes


async def test_a_constrained_run_is_one_engine_request(serve: ServeFactory) -> None:
    """Longer runs chain engine requests, but a grammar cannot continue across them: a constrained
    run stops at the engine's limit (here 4 tokens) instead."""
    served = await serve(max_new_tokens=4)
    body = {"prompt": "Verdict:", "max_tokens": 50, "seed": 0, "response_format": FORMAT}
    resp = await served.client.post("/v1/tasks/tmp", json=body)
    done = await wait_finished(served.client, resp.json()["task_id"])
    assert done["result"].startswith("{") and len(done["result"]) < 40


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"response_format": {"type": "yaml"}}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {}}}, "response_format"),
        ({"grammar": ""}, "grammar"),
        ({"grammar": 'start: "a"', "response_format": {"type": "json_object"}}, "grammar"),
        ({"response_format": "json_object"}, "response_format"),
        ({"grammar": "start: undefined_rule"}, None),
    ],
)
async def test_bad_constraints_are_422s(served: Served, fields: dict[str, Any], field: str | None) -> None:
    resp = await served.client.post("/v1/tasks/tmp", json={"prompt": "x", "max_tokens": 3, **fields})
    assert resp.status_code == 422, resp.text
    detail = resp.json()["detail"]
    assert isinstance(detail, list) and detail[0]["loc"][0] == "body"
    if field is not None:
        assert detail[0]["loc"][1] == field
