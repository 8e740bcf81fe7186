"""The task service's finer points: token ids of text the deltas do not fully name, forking a task while
it generates, and the Task API while the model is not loaded."""

from __future__ import annotations

import asyncio
from pathlib import Path

from taskhelp import GREEDY, Served, create, generate, wait_finished, wait_status

from rwkv_gateway.app import create_app
from rwkv_gateway.engine.tokenizer import Tokenizer
from rwkv_gateway.services.tasks.model import Run
from rwkv_gateway.settings import Settings

PROMPT = "Once upon a time"


def _whole_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_text_whose_tokens_the_deltas_do_not_all_name_is_tokenized_again(tokenizer: Tokenizer) -> None:
    text = "crab 🦀 claws"
    ids = tokenizer.encode(text)
    partial = [t for t in ids if not _whole_utf8(tokenizer.token_bytes(t))]
    assert len(partial) >= 2, "the emoji should be spelled by several byte tokens"
    run = Run(base=None, fed=[], stream=None, max_tokens=1)  # type: ignore[arg-type]
    # A delta names only the token that completed its characters.
    run.ids = [t for t in ids if t not in partial[:-1]]
    run.texts = [text]
    assert run.generated_ids(tokenizer) == ids
    run.ids = list(ids)
    assert run.generated_ids(tokenizer) == ids


async def test_forking_a_running_task_copies_what_it_has_generated_so_far(served: Served) -> None:
    client, service, engine = (
        served.client,
        served.app.state.services.tasks,
        served.app.state.services.model.engine,
    )
    source = await create(client, "create", prompt=PROMPT, max_tokens=4000, **GREEDY)
    await wait_status(client, source, 2)
    child = await service.fork(engine, source, tmp=True, prompt=" B", overrides={"max_tokens": 5})
    assert child.run is not None
    fed = list(child.run.fed)
    await client.post(f"/v1/tasks/{source}/stop", json={})
    src = await service.get(engine, source)
    prompt, b = engine.codec.encode(PROMPT), engine.codec.encode(" B")
    copied = fed[: len(fed) - len(b)]
    assert fed[len(copied) :] == b
    assert len(copied) > len(prompt) and copied == src.pending[: len(copied)]
    forked = (await wait_finished(client, child.id))["result"]
    _, fresh = await generate(client, prompt=fed, max_tokens=5, **GREEDY)
    assert forked == fresh


async def test_task_routes_say_503_while_the_model_is_not_loaded(tmp_path: Path) -> None:
    import httpx

    settings = Settings(model=tmp_path / "missing.pth", data_dir=tmp_path / "data")
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        async with asyncio.timeout(60):
            while app.state.services.model.load_error is None:  # noqa: ASYNC110 - the loader has no event to wait on
                await asyncio.sleep(0.01)
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            resp = await client.post("/v1/tasks/tmp", json={"prompt": "Hi"})
            assert (resp.status_code, resp.json()) == (503, {"detail": "the model is still loading"})
            assert resp.headers["retry-after"] == "5"
