"""CORS for the whole app, one mechanism: Starlette's CORSMiddleware, with one policy per group of paths.

Dialects whose browser clients live on other origins own a policy for their paths: the role-play UI
(docs/roleplay.md#5-cors) and the ChatGLM wrapper's clients (docs/glm.md#7-cors). Every other path
gets the app-wide `RWKV_GATEWAY_CORS_ORIGINS` policy, or none while that is empty. The policy sits
outside the routes, so every answer of a path carries it, errors raised outside any route (404, 405)
included.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from rwkv_gateway.settings import Settings

#: The methods every policy allows in a preflight answer.
ALLOW_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


@dataclass(frozen=True, slots=True)
class CORSPolicy:
    """Who may call a group of paths from a browser. `"*"` in `origins` allows any origin; with
    `credentials` the caller's origin is echoed (a browser sends cookies only to an echoed origin)."""

    origins: tuple[str, ...]
    credentials: bool = False
    expose_headers: tuple[str, ...] = ()
    #: The status of a successful preflight: Starlette answers 200 "OK"; the role-play paths answer
    #: 204 with no body, as they always have (docs/roleplay.md#5-cors).
    preflight_status: int = 200


def app_policy(settings: Settings) -> CORSPolicy | None:
    """The app-wide policy (`RWKV_GATEWAY_CORS_ORIGINS`), None while no origin is configured."""
    if not settings.cors_origins:
        return None
    return CORSPolicy(tuple(settings.cors_origins), expose_headers=("x-request-id", "retry-after"))


class _PolicyCORS(CORSMiddleware):
    """Starlette's middleware configured from a policy (every method, every requested header)."""

    def __init__(self, app: ASGIApp, policy: CORSPolicy) -> None:
        super().__init__(
            app,
            allow_origins=policy.origins,
            allow_methods=ALLOW_METHODS,
            allow_headers=["*"],
            allow_credentials=policy.credentials,
            expose_headers=policy.expose_headers,
        )
        self.preflight_status = policy.preflight_status

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code != 200 or self.preflight_status == 200:
            return response
        headers = {k: v for k, v in response.headers.items() if k not in ("content-length", "content-type")}
        return Response(status_code=self.preflight_status, headers=headers)


class PathCORS:
    """ASGI middleware: the policy of the request's path (exact paths) or else the default policy."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        scopes: Sequence[tuple[Iterable[str], CORSPolicy | None]],
        default: CORSPolicy | None,
    ) -> None:
        self.app = app
        self.default: ASGIApp = app if default is None else _PolicyCORS(app, default)
        self.by_path: dict[str, ASGIApp] = {}
        for paths, policy in scopes:
            handler: ASGIApp = app if policy is None else _PolicyCORS(app, policy)
            for path in paths:
                self.by_path.setdefault(path, handler)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.by_path.get(scope["path"], self.default)(scope, receive, send)
