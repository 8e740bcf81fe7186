"""Structured-output request fields -> an `OutputConstraint` (docs/structured-output.md#request-fields).

OpenAI's `response_format` object is the lingua franca (the OpenAI routes and the Task API take it), and
so is a raw `grammar` in the engine's syntax (vLLM's `guided_grammar`); vLLM's `guided_json` is a JSON
Schema. Every dialect converts its fields here, so each one rejects the same bad values with the same
message, naming the field the client sent.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from rwkv_gateway.domain.constraints import OutputConstraint
from rwkv_gateway.errors import InvalidParameter


def _schema_text(schema: object, param: str) -> str:
    if isinstance(schema, str):  # vLLM accepts the schema as JSON text too
        try:
            schema = json.loads(schema)
        except ValueError:
            raise InvalidParameter(f"{param}: the schema is not valid JSON", param=param) from None
    if not isinstance(schema, dict):
        raise InvalidParameter(f"{param}: the schema must be a JSON object", param=param)
    return json.dumps(schema, ensure_ascii=False)


def response_format_constraint(value: object, param: str = "response_format") -> OutputConstraint | None:
    """OpenAI's `response_format`: `{"type": "text"}` (no constraint), `{"type": "json_object"}` or
    `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise InvalidParameter(f"{param} must be an object with a 'type'", param=param)
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return OutputConstraint(kind="json_object")
    if kind != "json_schema":
        raise InvalidParameter(
            f"{param}.type must be 'text', 'json_object' or 'json_schema', got {kind!r}", param=param
        )
    spec: Any = value.get("json_schema")
    if not isinstance(spec, Mapping):
        raise InvalidParameter(f"{param}.json_schema is required for type 'json_schema'", param=param)
    name = spec.get("name")
    if name is not None and not isinstance(name, str):
        raise InvalidParameter(f"{param}.json_schema.name must be a string", param=param)
    if "schema" not in spec:
        raise InvalidParameter(f"{param}.json_schema.schema is required", param=param)
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise InvalidParameter(f"{param}.json_schema.strict must be a boolean", param=param)
    schema = spec["schema"]
    if not isinstance(schema, dict):
        raise InvalidParameter(f"{param}.json_schema.schema must be a JSON object", param=param)
    return OutputConstraint(kind="json_schema", schema=_schema_text(schema, param), strict=bool(strict))


def grammar_constraint(grammar: object, param: str = "grammar") -> OutputConstraint:
    """A raw grammar in the engine's syntax (docs/structured-output.md)."""
    if not isinstance(grammar, str) or not grammar.strip():
        raise InvalidParameter(f"{param} must be a non-empty grammar text", param=param)
    return OutputConstraint(kind="grammar", grammar=grammar)


def json_schema_constraint(schema: object, param: str) -> OutputConstraint:
    """A bare JSON Schema (object or JSON text), as vLLM's `guided_json` takes it."""
    return OutputConstraint(kind="json_schema", schema=_schema_text(schema, param))


def one_constraint(*candidates: tuple[str, OutputConstraint | None]) -> OutputConstraint | None:
    """The one constraint a request asked for; two fields that each ask for one are a 400."""
    given = [(param, c) for param, c in candidates if c is not None]
    if len(given) > 1:
        names = " and ".join(param for param, _ in given)
        raise InvalidParameter(f"{names} cannot be combined: give one of them", param=given[1][0])
    return given[0][1] if given else None
