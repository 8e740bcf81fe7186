"""OpenAI `response_format`, `grammar` and vLLM's `guided_*` on chat and text completions, through the
real app and engine (docs/openai.md#structured-output). The tiny test model writes noise, so only the
grammar can make a reply parse: every reply here must parse and validate against its schema."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import httpx
import jsonschema
import pytest

from rwkv_gateway.engine.tokenizer import Tokenizer

if TYPE_CHECKING:  # the fixtures' types (conftest modules are not importable by name at run time)
    from conftest import Served

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"

#: Nested objects, arrays, enums (one non-ASCII), integers and numbers, required and optional fields,
#: a nullable string. Bounded lengths, so that the noise the model writes ends in time.
PET: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "kind": {"enum": ["cat", "dog", "小鸟"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 30},
        "weight": {"type": "number", "minimum": 0, "maximum": 100},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "owner": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 8}, "verified": {"type": "boolean"}},
            "required": ["city", "verified"],
            "additionalProperties": False,
        },
        "note": {"type": ["string", "null"], "maxLength": 10},
    },
    "required": ["name", "kind", "age", "tags", "owner"],
    "additionalProperties": False,
}


def pet_format(strict: bool = True) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "pet", "schema": PET, "strict": strict}}


def ask(**fields: Any) -> dict[str, Any]:
    return {
        "messages": [{"role": "user", "content": "Describe a pet as JSON."}],
        "max_tokens": 400,
        **fields,
    }


def chunks(resp: httpx.Response) -> list[dict[str, Any]]:
    payloads = [line[len("data: ") :] for line in resp.text.splitlines() if line.startswith("data: ")]
    assert payloads[-1] == "[DONE]"
    return [json.loads(p) for p in payloads[:-1]]


def escape_bias(tokenizer: Tokenizer) -> dict[str, float]:
    """Push the model towards backslashes and CJK inside strings (the grammar keeps them valid: a
    backslash starts an escape, a quote inside a string must come escaped)."""
    bias = {t: 8.0 for text in ("\\", '\\"') for t in tokenizer.encode(text)}
    bias.update(dict.fromkeys(tokenizer.encode("日"), 4.0))
    return {str(t): b for t, b in bias.items()}


@pytest.mark.parametrize("seed", range(4))
async def test_every_json_schema_reply_parses_and_validates(
    served: Served, tokenizer: Tokenizer, seed: int
) -> None:
    fields = ask(response_format=pet_format(), seed=seed, logit_bias=escape_bias(tokenizer))
    resp = await served.client.post(CHAT, json=fields)
    assert resp.status_code == 200, resp.text
    choice = resp.json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    value = json.loads(choice["message"]["content"])
    jsonschema.validate(value, PET)

    stream = await served.client.post(CHAT, json={**fields, "stream": True})
    deltas = [c["choices"][0]["delta"] for c in chunks(stream) if c["choices"]]
    assert "".join(d.get("content") or "" for d in deltas) == choice["message"]["content"]
    assert chunks(stream)[-1]["choices"][0]["finish_reason"] == "stop"


async def test_escapes_and_non_ascii_survive(served: Served, tokenizer: Tokenizer) -> None:
    """Over a few seeds the biased model writes escapes and CJK inside strings; all of it parses."""
    texts = []
    for seed in range(6):
        fields = ask(response_format=pet_format(), seed=seed, logit_bias=escape_bias(tokenizer))
        content = (await served.client.post(CHAT, json=fields)).json()["choices"][0]["message"]["content"]
        jsonschema.validate(json.loads(content), PET)
        texts.append(content)
    assert any("\\" in t for t in texts), texts
    assert any(ord(c) > 127 for t in texts for c in t), texts


async def test_json_object_gives_an_object(served: Served) -> None:
    for seed in range(3):
        fields = ask(response_format={"type": "json_object"}, seed=seed, max_tokens=300)
        choice = (await served.client.post(CHAT, json=fields)).json()["choices"][0]
        if choice["finish_reason"] == "stop":
            assert isinstance(json.loads(choice["message"]["content"]), dict)
        else:  # noise may nest until max_tokens: then it is at least the start of an object
            assert choice["message"]["content"].startswith("{")


async def test_max_tokens_first_is_length(served: Served) -> None:
    fields = ask(response_format=pet_format(), max_tokens=3, seed=0)
    choice = (await served.client.post(CHAT, json=fields)).json()["choices"][0]
    assert choice["finish_reason"] == "length"
    assert choice["message"]["content"].startswith("{")
    stream = await served.client.post(CHAT, json={**fields, "stream": True})
    assert chunks(stream)[-1]["choices"][0]["finish_reason"] == "length"


async def test_text_format_is_unconstrained(served: Served) -> None:
    plain = (await served.client.post(CHAT, json=ask(seed=3, max_tokens=8))).json()
    text = (
        await served.client.post(CHAT, json=ask(seed=3, max_tokens=8, response_format={"type": "text"}))
    ).json()
    assert plain["choices"][0]["message"] == text["choices"][0]["message"]


async def test_text_completions_take_the_same_fields(served: Served) -> None:
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    }
    for fields in (
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": schema, "strict": True},
            }
        },
        {"guided_json": schema},
        {"guided_json": json.dumps(schema)},
    ):
        body = {"prompt": "JSON:", "max_tokens": 50, "seed": 1, **fields}
        resp = await served.client.post(COMPLETIONS, json=body)
        assert resp.status_code == 200, resp.text
        assert json.loads(resp.json()["choices"][0]["text"]) in ({"ok": True}, {"ok": False})
    for key in ("grammar", "guided_grammar"):
        body = {"prompt": "Answer:", "max_tokens": 10, "seed": 2, key: 'start: "yes" | "no"'}
        resp = await served.client.post(COMPLETIONS, json=body)
        assert resp.status_code == 200, resp.text
        choice = resp.json()["choices"][0]
        assert (choice["text"], choice["finish_reason"]) in (("yes", "stop"), ("no", "stop"))


async def test_a_grammar_on_chat(served: Served) -> None:
    resp = await served.client.post(CHAT, json=ask(grammar='start: "yes" | "no"', seed=0))
    assert resp.json()["choices"][0]["message"]["content"] in ("yes", "no")


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"response_format": "json_object"}, "response_format"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": [1]}}}, "response_format"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {}, "strict": "yes"}}},
            "response_format",
        ),
        ({"guided_json": "{not json"}, "guided_json"),
        ({"guided_json": [1, 2]}, "guided_json"),
        ({"grammar": "  "}, "grammar"),
        ({"guided_choice": ["a", "b"]}, "guided_choice"),
        ({"guided_regex": "a+"}, "guided_regex"),
        ({"response_format": {"type": "json_object"}, "grammar": 'start: "a"'}, "grammar"),
    ],
)
async def test_bad_fields_are_400s_naming_the_field(
    served: Served, fields: dict[str, Any], param: str
) -> None:
    for route, body in ((CHAT, ask(**fields)), (COMPLETIONS, {"prompt": "x", **fields})):
        resp = await served.client.post(route, json=body)
        assert resp.status_code == 400, resp.text
        error = resp.json()["error"]
        assert (error["type"], error["code"], error["param"]) == (
            "invalid_request_error",
            "invalid_value",
            param,
        )


async def test_a_schema_the_engine_cannot_compile_is_a_400(served: Served) -> None:
    bad = {"type": "string", "pattern": "(unclosed"}
    fields = ask(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": bad}})
    for stream in (False, True):
        resp = await served.client.post(CHAT, json={**fields, "stream": stream})
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"]["type"] == "invalid_request_error"
