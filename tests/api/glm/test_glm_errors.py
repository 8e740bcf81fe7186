"""Every failure of the ChatGLM-style routes comes back as `{"detail": "<field>: <reason>"}` JSON with
a 4xx/5xx status (never FastAPI's 422 or an HTML page), busy and not-ready are 503 with
Retry-After, a failure after the first byte is one SSE comment, and a client that goes away
cancels its engine stream."""

from __future__ import annotations

import asyncio
import json
import warnings
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from glmwire import SEP, stream_chat

from rwkv_gateway.api.glm import router as glm_router
from rwkv_gateway.api.glm import serving
from rwkv_gateway.api.glm.errors import GLMErrors
from rwkv_gateway.api.glm.schemas import GLMChatRequest
from rwkv_gateway.app import create_app
from rwkv_gateway.domain.types import GenerationRequest, SamplingParams
from rwkv_gateway.engine import admission as admission_mod
from rwkv_gateway.engine import runtime
from rwkv_gateway.engine.sampler import Sampler
from rwkv_gateway.errors import ModelLoadError
from rwkv_gateway.settings import Settings

if TYPE_CHECKING:
    from conftest import FullQueue, Served, ServeFactory

FAULT_SEED = 4242
CHAT_PATHS = ["/chat", "/chat-stream"]
ALL_PATHS = ["/chat", "/chat-stream", "/embedding", "/tokenize"]


def assert_detail(resp: httpx.Response, status: int, detail: str | None = None) -> str:
    assert resp.status_code == status, (resp.status_code, resp.text)
    assert resp.headers["content-type"] == "application/json"
    body = resp.json()
    assert set(body) == {"detail"} and isinstance(body["detail"], str) and body["detail"], body
    if detail is not None:
        assert body["detail"] == detail
    return str(body["detail"])


CHAT_BAD_BODIES = [
    (b"not json", "body: not valid JSON"),
    (b"\xff\xfe garbage", "body: not valid JSON"),
    (b"", "body: not valid JSON"),
    (b"[1, 2]", "body: expected a JSON object"),
    (b'"hello"', "body: expected a JSON object"),
    (b"{}", "prompt: field required"),
    (b'{"history": [], "max_length": 100}', "prompt: field required"),
    (b'{"prompt": 5}', "prompt: Input should be a valid string"),
    (b'{"prompt": ["Hi"]}', "prompt: Input should be a valid string"),
    (b'{"prompt": "x", "history": "q a"}', "history: Input should be a valid list"),
    (b'{"prompt": "x", "history": {"q": "a"}}', "history: Input should be a valid list"),
    (b'{"prompt": "x", "history": ["q", "a"]}', "history[0]: Input should be a valid list"),
    (b'{"prompt": "x", "history": [["q", "a"], ["q2", 7]]}', "history[1][1]: Input should be a valid string"),
    (b'{"prompt": "x", "max_length": "4096"}', "max_length: Input should be a valid integer"),
    (b'{"prompt": "x", "max_length": 100.5}', "max_length: Input should be a valid integer"),
    (b'{"prompt": "x", "max_length": true}', "max_length: Input should be a valid integer"),
    (b'{"prompt": "x", "max_length": 0}', "max_length: must be a positive number of tokens, got 0"),
    (b'{"prompt": "x", "max_length": -3}', "max_length: must be a positive number of tokens, got -3"),
    (b'{"prompt": "x", "top_p": 1.5}', "top_p: must be in [0, 1], got 1.5"),
    (b'{"prompt": "x", "top_p": "0.7"}', "top_p: Input should be a valid number"),
    (b'{"prompt": "x", "temperature": -1}', "temperature: must be >= 0, got -1.0"),
    (b'{"prompt": "x", "temperature": NaN}', "temperature: must be a finite number, got nan"),
    (b'{"prompt": "x", "temperature": "hot"}', "temperature: Input should be a valid number"),
]


@pytest.mark.parametrize("path", CHAT_PATHS)
@pytest.mark.parametrize(("content", "detail"), CHAT_BAD_BODIES, ids=[d for _, d in CHAT_BAD_BODIES])
async def test_bad_chat_bodies_are_400_naming_the_field(
    served: Served, path: str, content: bytes, detail: str
) -> None:
    resp = await served.client.post(path, content=content, headers={"content-type": "application/json"})
    assert_detail(resp, 400, detail)


EMBEDDING_BAD_BODIES = [
    (b"not json", "body: not valid JSON"),
    (b"[]", "body: expected a JSON object"),
    (b'{"prompt": 5}', "prompt: expected a string or a list of strings"),
    (b'{"prompt": ["a", 3]}', "prompt: item 1 is not a string"),
    (b'{"prompt": ["a", ""]}', "prompt[1]: must not be empty"),
    (b'{"prompt": ""}', "prompt: must not be empty"),
]


@pytest.mark.parametrize(
    ("content", "detail"), EMBEDDING_BAD_BODIES, ids=[d for _, d in EMBEDDING_BAD_BODIES]
)
async def test_bad_embedding_bodies_are_400_naming_the_field(
    served: Served, content: bytes, detail: str
) -> None:
    resp = await served.client.post(
        "/embedding", content=content, headers={"content-type": "application/json"}
    )
    assert_detail(resp, 400, detail)


TOKENIZE_BAD_BODIES = [
    (b"not json", "body: not valid JSON"),
    (b"[1, 2, 3]", "body: expected a JSON object"),
    (b"{}", "prompt: field required"),
    (b'{"prompt": 5}', "prompt: Input should be a valid string"),
    (b'{"prompt": "x", "max_length": "10"}', "max_length: Input should be a valid integer"),
    (b'{"prompt": "x", "max_length": 0}', "max_length: must be a positive number of tokens, got 0"),
]


@pytest.mark.parametrize(("content", "detail"), TOKENIZE_BAD_BODIES, ids=[d for _, d in TOKENIZE_BAD_BODIES])
async def test_bad_glm_tokenize_bodies_are_400_naming_the_field(
    served: Served, content: bytes, detail: str
) -> None:
    resp = await served.client.post(
        "/tokenize", content=content, headers={"content-type": "application/json"}
    )
    assert_detail(resp, 400, detail)


async def test_body_over_max_body_bytes_is_413(serve: ServeFactory) -> None:
    served = await serve(max_body_bytes=2048)
    big = json.dumps({"prompt": "x" * 4000}).encode()

    async def chunked() -> AsyncIterator[bytes]:
        for i in range(0, len(big), 512):
            yield big[i : i + 512]

    for path in ALL_PATHS:
        resp = await served.client.post(path, content=big, headers={"content-type": "application/json"})
        assert_detail(resp, 413, "the request body is larger than 2048 bytes")
        resp = await served.client.post(path, content=chunked(), headers={"content-type": "application/json"})
        assert resp.request.headers.get("transfer-encoding") == "chunked"
        assert_detail(resp, 413, "the request body is larger than 2048 bytes")
    resp = await served.client.post("/chat", json={"prompt": "Hi", "max_length": 20, "temperature": 0})
    assert resp.status_code == 200, resp.text


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/chat"), ("GET", "/chat-stream"), ("PUT", "/embedding"), ("DELETE", "/chat")],
)
async def test_wrong_method_on_a_glm_path_is_405_in_the_glm_shape(
    served: Served, method: str, path: str
) -> None:
    resp = await served.client.request(method, path)
    assert_detail(resp, 405, "Method Not Allowed")
    assert "POST" in resp.headers["allow"]


def test_error_scopes_are_the_exact_glm_paths() -> None:
    scopes = glm_router.error_scopes()
    assert [path for path, _ in scopes] == ["/chat", "/chat-stream", "/embedding"]
    assert all(isinstance(renderer, GLMErrors) for _, renderer in scopes)


async def test_queue_full_is_503_server_busy_with_retry_after(
    serve: ServeFactory, full_queue: FullQueue
) -> None:
    served = await serve(queue_size=1, max_batch_size=1)
    async with full_queue(served.app.state.services.model.engine):
        for path, body in [
            ("/chat", {"prompt": "Hi"}),
            ("/chat-stream", {"prompt": "Hi"}),
            ("/embedding", {"prompt": ["Hi"]}),
        ]:
            resp = await served.client.post(path, json=body)
            assert_detail(resp, 503, "server busy")
            assert int(resp.headers["retry-after"]) >= 1
    resp = await served.client.post("/chat", json={"prompt": "Hi", "max_length": 20})
    assert resp.status_code == 200, resp.text


async def test_model_not_loaded_is_503_with_retry_after(
    tmp_path: Path, v7_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(settings: Settings) -> Any:  # fault injection: the checkpoint cannot be loaded
        raise ModelLoadError("injected load failure")

    monkeypatch.setattr(runtime, "load", fail)
    app = create_app(Settings(model=v7_path, data_dir=tmp_path / "data"))
    failed = asyncio.Event()
    app.state.services.model.on_load_failure = failed.set
    async with app.router.lifespan_context(app):
        await asyncio.wait_for(failed.wait(), 60)
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            for path, body in [
                ("/chat", {"prompt": "Hi"}),
                ("/chat-stream", {"prompt": "Hi"}),
                ("/embedding", {"prompt": ["Hi"]}),
                ("/tokenize", {"prompt": "Hi"}),
            ]:
                resp = await client.post(path, json=body)
                assert_detail(resp, 503, "the model is still loading")
                assert resp.headers["retry-after"] == "5"


async def test_engine_failure_is_500_json_before_the_stream_and_a_comment_after(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    class FaultySampler(Sampler):  # fault injection: the third token of a marked request fails
        calls = 0

        def sample(self, logits):  # type: ignore[no-untyped-def]
            if self.params.seed == FAULT_SEED:
                self.calls += 1
                if self.calls > 2:
                    raise RuntimeError("injected sampling fault")
            return super().sample(logits)

    monkeypatch.setattr(admission_mod, "Sampler", FaultySampler)
    real_request = serving.GLMChat.engine_request

    async def seeded(self: serving.GLMChat) -> tuple[GenerationRequest, int]:
        request, prompt_tokens = await real_request(self)
        if self.req.prompt == "fail":
            request.sampling = SamplingParams(temperature=0, seed=FAULT_SEED)
        return request, prompt_tokens

    monkeypatch.setattr(serving.GLMChat, "engine_request", seeded)
    body = {"prompt": "fail", "max_length": 60}

    resp = await served.client.post("/chat", json=body)
    assert_detail(resp, 500, "sampling failed: injected sampling fault")

    streamed = await stream_chat(served.client, body)
    assert streamed.events, "the failure came before any text"
    assert streamed.comments == [": error - sampling failed: injected sampling fault"]
    assert streamed.raw.endswith(b": error - sampling failed: injected sampling fault" + SEP)

    resp = await served.client.post("/chat", json={"prompt": "fine", "max_length": 20})  # others unaffected
    assert resp.status_code == 200, resp.text


async def test_unexpected_failure_is_500_in_the_glm_shape(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = served.app.state.services.model.engine

    async def broken_embed(inputs: Any) -> Any:  # fault injection: a bug below the route
        raise RuntimeError("boom")

    monkeypatch.setattr(engine, "embed", broken_embed)
    resp = await served.client.post("/embedding", json={"prompt": ["Hi"]})
    assert_detail(resp, 500, "internal server error")


async def test_a_stream_closed_by_its_client_cancels_the_engine_stream(served: Served) -> None:
    engine = served.app.state.services.model.engine
    job = serving.GLMChat(
        engine, served.settings, GLMChatRequest(prompt="Hi", temperature=0, max_length=4000)
    )
    admitted = await job.admit()
    events = job.events(admitted)
    first = await anext(aiter(events))
    assert first.startswith(b"data: {") and first.endswith(SEP)
    await events.aclose()  # what sse-starlette does when the client disconnects
    _, finish = await admitted.stream.collect()
    assert finish.reason.value == "cancelled"
    assert finish.usage.completion_tokens < 4000


@pytest.mark.parametrize("path", ALL_PATHS)
async def test_cors_is_open_on_glm_paths(served: Served, path: str) -> None:
    origin = "http://app.example"
    preflight = await served.client.options(
        path,
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
    )
    assert preflight.status_code == 200, preflight.text
    assert preflight.headers["access-control-allow-origin"] == origin
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert preflight.headers["access-control-allow-headers"] == "content-type"
    assert preflight.headers["access-control-allow-credentials"] == "true"
    # Errors carry it too, so a browser client can read the detail.
    resp = await served.client.post(path, content=b"[]", headers={"Origin": origin})
    assert resp.status_code == 400
    assert resp.headers["access-control-allow-origin"] == origin
    resp = await served.client.post(path, content=b"[]")
    assert "access-control-allow-origin" not in resp.headers


async def test_prompt_over_max_prompt_tokens_is_400(serve: ServeFactory) -> None:
    served = await serve(max_prompt_tokens=32)
    body = {"prompt": "The quick brown fox jumps over the lazy dog. " * 8, "max_length": 100_000}
    for path in CHAT_PATHS:
        resp = await served.client.post(path, json=body)
        detail = assert_detail(resp, 400)
        assert detail.startswith("prompt: the prompt has ") and detail.endswith("the limit is 32")


async def test_openapi_documents_the_glm_bodies(served: Served) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        paths = served.app.openapi()["paths"]
    # Other dialects' schema warnings are theirs; none may come from this one.
    assert not [w for w in caught if "api/glm" in str(w.message)], [str(w.message) for w in caught]
    for path, field in [("/chat", "history"), ("/chat-stream", "max_length"), ("/embedding", "prompt")]:
        schema = paths[path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert field in schema["properties"], schema
