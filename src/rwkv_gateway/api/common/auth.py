"""API-key checks for the OpenAI-style routes (and the Task API, which shares them).

With no active OpenAI key in the database the API is open and any Bearer value is accepted (the SDKs
refuse to start without one). Once a key exists, every call needs `Authorization: Bearer <key>`;
a missing or wrong key is a 401. Whether keys exist is cached for a few seconds, since keys are made
by the CLI in another process and every request would otherwise ask the database.
"""

from __future__ import annotations

import time

from rwkv_gateway.errors import Unauthorized
from rwkv_gateway.services.credentials import CredentialService

_CACHE_SECONDS = 5.0


class OpenAIKeys:
    """The key check of one app, with its short cache of "are there keys?"."""

    def __init__(self, credentials: CredentialService) -> None:
        self._credentials = credentials
        self._cached: tuple[float, bool] | None = None

    def forget(self) -> None:
        """Ask the database again on the next request (tests that make or revoke keys)."""
        self._cached = None

    async def _required(self) -> bool:
        now = time.monotonic()
        if self._cached is not None and now - self._cached[0] < _CACHE_SECONDS:
            return self._cached[1]
        required = await self._credentials.any_active("openai")
        self._cached = (now, required)
        return required

    async def check(self, authorization: str) -> str | None:
        """The id of the presented key when keys are configured, else None (open API)."""
        if not await self._required():
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("Missing API key: send 'Authorization: Bearer <key>'.")
        info = await self._credentials.verify_openai_key(token.strip())
        if info is None:
            raise Unauthorized("Incorrect API key provided.")
        return str(info.id)
