"""The official `openai` SDK against a live server with the G-series template: `reasoning_effort`
goes out, `reasoning_content` and `reasoning_tokens` come back (docs/openai.md#reasoning)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from support.live import LiveServer, live_server

GT = 63  # ">" in the World vocabulary: the biased tiny model writes only that


@pytest.fixture(scope="module")
def g_server(v7_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with live_server(v7_path, tmp_path_factory.mktemp("openai-g-server"), chat_template="g-series") as srv:
        yield srv


@pytest.fixture(scope="module")
def g_client(g_server: LiveServer) -> Iterator[openai.OpenAI]:
    with g_server.openai() as c:
        yield c


def test_sdk_reads_reasoning_content_and_reasoning_tokens(g_client: openai.OpenAI) -> None:
    models = g_client.models.list().data
    assert [m.model_extra and m.model_extra["chat_template"] for m in models] == ["g-series"]
    reply = g_client.chat.completions.create(
        model=models[0].id,
        messages=[{"role": "user", "content": "Who made RWKV?"}],
        max_tokens=5,
        logit_bias={str(GT): 100},
        reasoning_effort="high",
    )
    message = reply.choices[0].message
    assert message.content == ""
    assert message.model_extra == {"reasoning_content": ">>>>"}
    assert reply.usage is not None and reply.usage.completion_tokens_details is not None
    assert reply.usage.completion_tokens_details.reasoning_tokens == 5
    stream = g_client.chat.completions.create(
        model=models[0].id,
        messages=[{"role": "user", "content": "Who made RWKV?"}],
        max_tokens=5,
        logit_bias={str(GT): 100},
        reasoning_effort="high",
        stream=True,
    )
    reasoning = "".join(
        (chunk.choices[0].delta.model_extra or {}).get("reasoning_content", "")
        for chunk in stream
        if chunk.choices
    )
    assert reasoning == ">>>>"
