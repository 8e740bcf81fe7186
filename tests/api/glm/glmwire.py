"""Helpers for the ChatGLM-style wire tests: a streaming client that parses the exact SSE framing of
docs/glm.md#3-chat-stream and rebuilds the reply with `+=`, and a spy on the engine's requests."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import httpx

from rwkv_gateway.domain.types import GenerationRequest

SEP = b"\r\n\r\n"
KEYS = ["content", "prompt_tokens", "completion_tokens", "total_tokens", "model", "object"]
PING = re.compile(r"^: ping - \d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}\.\d{6}$")


@dataclass
class StreamResult:
    content: str = ""
    events: list[dict[str, Any]] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    headers: httpx.Headers | None = None
    raw: bytes = b""


def check_frame(frame: bytes, result: StreamResult) -> None:
    """One event: `data: {json}` (the reference's separators, raw UTF-8) or one `: comment` line."""
    text = frame.decode("utf-8")
    assert "\r" not in text and "\n" not in text, f"multi-line frame: {frame!r}"
    if text.startswith(":"):
        result.comments.append(text)
        return
    assert text.startswith("data: "), f"not a data event: {frame!r}"
    payload = text[len("data: ") :]
    event = json.loads(payload)
    assert list(event) == KEYS, event
    # Byte-exact: ", " and ": " separators, no \u escapes.
    assert payload == json.dumps(event, ensure_ascii=False), payload
    assert event["content"], "an event with an empty delta was sent"
    result.events.append(event)
    result.content += event["content"]  # what the seed's axios client does


async def stream_chat(client: httpx.AsyncClient, body: dict[str, Any]) -> StreamResult:
    """POST /chat-stream and read it incrementally, splitting frames on CRLF CRLF as they arrive."""
    result = StreamResult()
    buffer = b""
    async with client.stream("POST", "/chat-stream", json=body) as resp:
        assert resp.status_code == 200, (await resp.aread()).decode()
        result.headers = resp.headers
        async for chunk in resp.aiter_raw():
            result.raw += chunk
            buffer += chunk
            while SEP in buffer:
                frame, buffer = buffer.split(SEP, 1)
                check_frame(frame, result)
    assert buffer == b"", f"the stream ended inside a frame: {buffer!r}"
    return result


class Spy:
    """Records the GenerationRequests the real engine is given (the engine still runs them)."""

    def __init__(self, engine: Any) -> None:
        self.requests: list[GenerationRequest] = []
        real = engine.submit

        async def submit(request: GenerationRequest) -> Any:
            self.requests.append(request)
            return await real(request)

        engine.submit = submit

    @property
    def last(self) -> GenerationRequest:
        return self.requests[-1]
