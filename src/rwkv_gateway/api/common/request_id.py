"""Request ids: every HTTP response carries an `X-Request-Id`, and every log line written while
serving it names the same id.

A client (or the proxy in front) may send its own id; it is kept when it is printable ASCII of at
most 128 characters, otherwise replaced by a fresh one, so a hostile header can neither forge log
lines (newlines) nor bloat them. The id is set in `logs.request_id_var` for the request's duration;
tasks the request spawns (stream senders, thread-pool calls) inherit it.
"""

from __future__ import annotations

import re
import uuid

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rwkv_gateway.logs import request_id_var

HEADER = "x-request-id"
MAX_LENGTH = 128
_VALID = re.compile(rf"[\x20-\x7e]{{1,{MAX_LENGTH}}}")


def accepted_request_id(value: str | None) -> str | None:
    """The client's id when it is acceptable (stripped of surrounding blanks), else None."""
    if value is None:
        return None
    value = value.strip()
    return value if _VALID.fullmatch(value) else None


def new_request_id() -> str:
    return uuid.uuid4().hex


class RequestId:
    """Pure ASGI middleware: take or make the request id, expose it to logging, echo it on the
    response (JSON, errors and event streams alike: the header goes out with the response start)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        given = None
        for name, value in scope.get("headers", ()):
            if name == b"x-request-id":
                given = value.decode("latin-1")
                break
        request_id = accepted_request_id(given) or new_request_id()
        scope.setdefault("state", {})["request_id"] = request_id

        async def with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers[HEADER] = request_id  # replaces any the route set: the log and header agree
            await send(message)

        token = request_id_var.set(request_id)
        try:
            await self.app(scope, receive, with_id)
        finally:
            request_id_var.reset(token)
