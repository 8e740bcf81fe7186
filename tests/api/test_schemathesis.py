"""schemathesis against the app's own OpenAPI schema, every route, on a live server: generated
requests (valid and invalid by the schema) never get a 5xx, and every failure comes back in the
envelope of the dialect that owns the path.

The number of examples per route is bounded (`EXAMPLES`) so the run fits CI; replies are capped at 4
tokens by the server. Routes whose bodies the schema cannot describe (the role-play routes read form
or multipart fields by hand; `/tokenize` takes either dialect's body) are still called: schemathesis
then sends what the schema allows (no body, or any JSON), which the envelope check covers.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "faults"))
from support.live import start_server

EXAMPLES = 6
ROLEPLAY = (
    "/login",
    "/characters/",
    "/chat/reply",
    "/chat/resay",
    "/chat/reset",
    "/chat/back",
    "/chat/tamper",
    "/debug/",
)
GLM = ("/chat", "/chat-stream", "/embedding", "/tokenize")


@pytest.fixture(scope="module")
def live_schema(v7_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    live = start_server(v7_path, tmp_path_factory.mktemp("schemathesis"), max_new_tokens="4")
    try:
        yield schemathesis.openapi.from_url(f"{live.url}/openapi.json")
    finally:
        assert live.stop() == 0


def dialect_of(path: str) -> str:
    if path.startswith("/v1/tasks"):
        return "tasks"
    if path.startswith("/v1/") or path == "/detokenize":
        return "openai"
    if path.startswith(("/rpc/2.0/", "/oauth/2.0/")):
        return "wenxin"
    if path in GLM:
        return "glm"
    if path.startswith(ROLEPLAY):
        return "roleplay"
    return "ops"


def check_envelope(path: str, status: int, headers: dict[str, str], raw: bytes) -> None:
    assert status < 500, (path, status, raw[:300])
    dialect = dialect_of(path)
    if dialect == "roleplay":
        # Always HTTP 200 with {"data", "message", "code"}, or a stream / a file for some routes.
        assert status == 200, (path, status, raw[:300])
        if headers.get("content-type", "").startswith("application/json"):
            assert list(json.loads(raw)) == ["data", "message", "code"], raw[:300]
        return
    if dialect == "wenxin" and path.startswith("/rpc/"):
        assert status == 200, (path, status, raw[:300])  # errors are {error_code, error_msg} in a 200
        if headers.get("content-type", "").startswith("application/json"):
            body = json.loads(raw)
            assert "error_code" in body or "result" in body, body
        return
    if status < 400:
        return
    assert headers.get("content-type", "").startswith("application/json"), (path, status, headers)
    body = json.loads(raw)
    if dialect == "openai":
        assert set(body) == {"error"}, (path, body)
        assert set(body["error"]) == {"message", "type", "param", "code"}, (path, body)
    elif dialect == "glm":
        assert set(body) == {"detail"} and isinstance(body["detail"], str), (path, body)
    elif dialect == "tasks":
        # The rwkv-api server's shape: a message, or FastAPI's list of problems with a 422.
        assert set(body) == {"detail"}, (path, body)
        assert isinstance(body["detail"], str) or (status == 422 and isinstance(body["detail"], list)), body
    elif dialect == "wenxin":  # the OAuth token endpoint: Baidu's {error, error_description}
        assert {"error", "error_description"} <= set(body), (path, body)
    else:
        pytest.fail(f"{path} answered {status}: {raw[:300]!r}")


def fuzz(operation: Any, mode: GenerationMode, tried: dict[str, int]) -> None:
    """Up to EXAMPLES generated cases of one operation, each sent to the live server and checked."""

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
        phases=[Phase.explicit, Phase.generate],
    )
    def run(case: Any) -> None:
        response = case.call(timeout=60)
        tried[operation.label] = tried.get(operation.label, 0) + 1
        headers = {k.lower(): v[0] if isinstance(v, list) else v for k, v in response.headers.items()}
        check_envelope(operation.path, response.status_code, headers, response.content)

    try:
        run()
    except Unsatisfiable:
        # An operation with no parameters and no body has nothing to break: no negative cases.
        if mode is not GenerationMode.NEGATIVE:
            raise


def test_no_5xx_and_dialect_envelopes(
    live_schema: Any, record_property: Callable[[str, object], None]
) -> None:
    # The schemathesis pytest plugin's lazy schemas do not run on this pytest; drive hypothesis here.
    tried: dict[str, int] = {}
    for result in live_schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            fuzz(operation, mode, tried)
    assert len(tried) >= 40, sorted(tried)
    record_property(
        "figure",
        f"schemathesis: {sum(tried.values())} generated requests over {len(tried)} operations "
        f"(positive and negative), 0 5xx, every error in its dialect's envelope",
    )
