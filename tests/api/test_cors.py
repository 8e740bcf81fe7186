"""One CORS mechanism (api/common/cors.py): each group of paths answers with its own policy, on
answers, errors and preflights alike. The per-dialect details are pinned by each dialect's tests."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tests.api.conftest import Served, ServeFactory

UI = "http://ui.example"
API = "http://api.example"


async def test_each_group_of_paths_keeps_its_own_policy(serve: ServeFactory) -> None:
    client = (await serve(cors_origins=[API])).client
    # Role-play paths: their own policy (any origin, echoed with credentials), not the app-wide one.
    resp = await client.post("/characters/list", data={"token": "null"}, headers={"Origin": UI})
    assert resp.headers["access-control-allow-origin"] == UI
    assert resp.headers["access-control-allow-credentials"] == "true"
    assert "access-control-expose-headers" not in resp.headers
    # ChatGLM paths follow the app-wide policy once one is set (docs/glm.md#7-cors) ...
    resp = await client.post("/chat", content=b"[]", headers={"Origin": UI})
    assert "access-control-allow-origin" not in resp.headers
    resp = await client.post("/chat", content=b"[]", headers={"Origin": API})
    assert resp.headers["access-control-allow-origin"] == API
    assert resp.headers["access-control-expose-headers"] == "x-request-id, retry-after"
    # ... as every other path does.
    resp = await client.get("/v1/models", headers={"Origin": API})
    assert resp.headers["access-control-allow-origin"] == API


async def test_errors_raised_outside_a_route_carry_the_policy_of_their_path(served: Served) -> None:
    # A wrong method never reaches a route; the ChatGLM path's open policy applies all the same.
    resp = await served.client.get("/chat", headers={"Origin": UI})
    assert resp.status_code == 405
    assert resp.headers["access-control-allow-origin"] == UI
    # No app-wide origins: the OpenAI paths have no CORS at all.
    resp = await served.client.get("/v1/models", headers={"Origin": UI})
    assert "access-control-allow-origin" not in resp.headers
