"""The OpenAI routes' structured-output fields -> the request's `OutputConstraint`
(docs/openai.md#structured-output).

`response_format` as OpenAI defines it, plus the raw `grammar` of this server and vLLM's guided-decoding
fields (`guided_json`, `guided_grammar`), on chat and text completions alike. At most one of them per
request; vLLM's `guided_choice` and `guided_regex` are refused rather than ignored.
"""

from __future__ import annotations

from rwkv_gateway.api.openai.schemas import SamplingFields
from rwkv_gateway.domain.constraints import OutputConstraint
from rwkv_gateway.domain.structured import (
    grammar_constraint,
    json_schema_constraint,
    one_constraint,
    response_format_constraint,
)
from rwkv_gateway.errors import InvalidParameter


def output_constraint(req: SamplingFields) -> OutputConstraint | None:
    for unsupported in ("guided_choice", "guided_regex"):
        if getattr(req, unsupported) is not None:
            raise InvalidParameter(
                f"{unsupported} is not supported: use response_format, guided_json or grammar",
                param=unsupported,
            )
    grammar, guided_grammar, guided_json = req.grammar, req.guided_grammar, req.guided_json
    return one_constraint(
        ("response_format", response_format_constraint(req.response_format)),
        ("grammar", None if grammar is None else grammar_constraint(grammar)),
        (
            "guided_grammar",
            None if guided_grammar is None else grammar_constraint(guided_grammar, "guided_grammar"),
        ),
        ("guided_json", None if guided_json is None else json_schema_constraint(guided_json, "guided_json")),
    )
