"""CORS for the role-play routes only: the UI is served from another origin (port 9000 by convention).

Every response of these paths (envelopes, errors and streams) carries `Access-Control-Allow-Origin`
for an allowed `Origin` (echoed, with `Vary: Origin`), and OPTIONS is answered as a preflight (204,
allow headers) without running the token check (docs/roleplay.md#5-cors). Other paths are untouched,
so the `/v1` CORS setting stays what `cors_origins` says.
"""

from __future__ import annotations

from collections.abc import Iterable

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

ALLOW_METHODS = "DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT"


class RoleplayCORS:
    def __init__(self, app: ASGIApp, *, paths: Iterable[str], origins: Iterable[str]) -> None:
        self.app = app
        self.paths = frozenset(paths)
        self.origins = frozenset(origins)
        self.any_origin = "*" in self.origins

    def _allowed(self, origin: str) -> bool:
        return self.any_origin or origin in self.origins

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        origin = headers.get("origin")
        if scope["method"] == "OPTIONS":
            out = [
                (b"access-control-allow-methods", ALLOW_METHODS.encode()),
                (b"access-control-max-age", b"600"),
            ]
            if origin is not None and self._allowed(origin):
                out += [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")]
                requested = headers.get("access-control-request-headers")
                if requested:
                    out.append((b"access-control-allow-headers", requested.encode("latin-1")))
            await send({"type": "http.response.start", "status": 204, "headers": out})
            await send({"type": "http.response.body", "body": b""})
            return
        if origin is None or not self._allowed(origin):
            await self.app(scope, receive, send)
            return

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                response_headers = MutableHeaders(scope=message)
                response_headers["Access-Control-Allow-Origin"] = origin
                vary = response_headers.get("vary")
                if vary is None:
                    response_headers["Vary"] = "Origin"
                elif "origin" not in vary.lower():
                    response_headers["Vary"] = f"{vary}, Origin"
            await send(message)

        await self.app(scope, receive, send_with_cors)
