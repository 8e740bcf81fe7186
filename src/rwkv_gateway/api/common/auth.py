"""API-key checks for the OpenAI-style routes (and the Task API, which shares them).

With no active OpenAI key in the database the API is open and any Bearer value is accepted (the SDKs
refuse to start without one). Once a key exists, every call needs `Authorization: Bearer <key>`;
a missing or wrong key is a 401. Whether keys exist is cached for a few seconds, since keys are made
by the CLI in another process and every request would otherwise ask the database.
"""

from __future__ import annotations

import time
from typing import Protocol

from fastapi import Request

from rwkv_gateway.errors import Unauthorized

_CACHE_SECONDS = 5.0


class KeyChecker(Protocol):
    async def any_active(self, kind: str) -> bool: ...

    async def verify_openai_key(self, presented: str) -> object | None: ...


async def _keys_required(request: Request, checker: KeyChecker) -> bool:
    state = request.app.state
    cached: tuple[float, bool] | None = getattr(state, "openai_keys_cache", None)
    now = time.monotonic()
    if cached is not None and now - cached[0] < _CACHE_SECONDS:
        return cached[1]
    required = await checker.any_active("openai")
    state.openai_keys_cache = (now, required)
    return required


async def openai_key(request: Request) -> str | None:
    """Dependency: the id of the presented key when keys are configured, else None (open API)."""
    checker: KeyChecker | None = getattr(request.app.state, "credentials", None)
    if checker is None or not await _keys_required(request, checker):
        return None
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("Missing API key: send 'Authorization: Bearer <key>'.")
    info = await checker.verify_openai_key(token.strip())
    if info is None:
        raise Unauthorized("Incorrect API key provided.")
    return str(getattr(info, "id", "") or "") or None
