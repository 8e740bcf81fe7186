"""Baidu wenxinworkshop routes: the OAuth token endpoint, the custom-model chat API and the console's
model-list lookup that qianfan makes.

Checks run in Baidu's order: the method (405 -> 336101), authentication (a `bce-auth-v1`
Authorization header, verified against the stored AK/SK, wins over `?access_token=`), the api_name
(unknown -> 336005, the code qianfan surfaces as is; code 3 would send it to the console first), then
the body (schemas.py) and admission. Every failure is HTTP 200 `{"error_code", "error_msg"}` (errors.py).
"""

from __future__ import annotations

import math
import secrets
from typing import Any
from urllib.parse import parse_qsl

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from rwkv_gateway.api.common.deps import CredentialsDep, Services, ServicesDep, SettingsDep
from rwkv_gateway.api.common.disconnect import unless_disconnected
from rwkv_gateway.api.common.errors import ErrorRenderer, dialect_route
from rwkv_gateway.api.wenxin.auth import authenticate
from rwkv_gateway.api.wenxin.errors import API_NAME_NOT_EXIST, WenxinError, WenxinErrors
from rwkv_gateway.api.wenxin.schemas import parse_chat_request
from rwkv_gateway.api.wenxin.serving import ChatCompletion, dumps
from rwkv_gateway.errors import StorageUnavailable
from rwkv_gateway.services.credentials import IssuedToken
from rwkv_gateway.settings import Settings

RENDERER = WenxinErrors()
router = APIRouter(route_class=dialect_route(RENDERER), tags=["wenxinworkshop"])

#: qianfan's default `QIANFAN_MODEL_API_PREFIX`.
MODEL_API_PREFIX = "/rpc/2.0/ai_custom/v1/wenxinworkshop"
_HEADERS = {"Statement": "AI-generated"}


def _oauth_error(status: int, error: str, description: str) -> JSONResponse:
    return JSONResponse({"error": error, "error_description": description}, status_code=status)


async def _oauth_params(request: Request) -> dict[str, str]:
    """The query string's parameters, completed by a form body (a JSON body, as qianfan sends, is ignored)."""
    params = dict(request.query_params)
    if request.method == "POST":
        body = await request.body()
        if request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
            for key, value in parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True):
                params.setdefault(key, value)
    return params


def _token_body(issued: IssuedToken, settings: Settings) -> dict[str, Any]:
    scopes = ["public", *(f"ai_custom_{name}" for name in settings.wenxin_api_names)]
    return {
        "refresh_token": issued.refresh_token,
        "expires_in": issued.expires_in,
        # Baidu's legacy session pair; nothing here uses them, but clients may expect the keys.
        "session_key": secrets.token_urlsafe(48),
        "access_token": issued.access_token,
        "scope": " ".join(scopes),
        "session_secret": secrets.token_hex(16),
    }


# Two registrations rather than one api_route, so that the two operations get their own OpenAPI ids.
@router.get("/oauth/2.0/token", response_model=None, operation_id="wenxin_oauth_token_get")
@router.post("/oauth/2.0/token", response_model=None, operation_id="wenxin_oauth_token")
async def oauth_token(request: Request, credentials: CredentialsDep, settings: SettingsDep) -> JSONResponse:
    """Issue an access token for an AK/SK pair (`grant_type=client_credentials&client_id=AK&
    client_secret=SK`, in the query or a form body), or renew one (`grant_type=refresh_token`).
    Failures use the OAuth shape: 401 `invalid_client`, 400 `unsupported_grant_type` / `invalid_request`,
    503 `temporarily_unavailable` while the database cannot be reached."""
    params = await _oauth_params(request)
    try:
        return await _oauth_grant(params, credentials, settings)
    except StorageUnavailable as exc:
        # RFC 6749's code for "try again later", in the OAuth shape this endpoint always answers in.
        response = _oauth_error(503, "temporarily_unavailable", exc.message)
        response.headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
        return response


async def _oauth_grant(
    params: dict[str, str], credentials: CredentialsDep, settings: Settings
) -> JSONResponse:
    grant = params.get("grant_type", "")
    ttl = settings.wenxin_token_ttl_s
    if not grant:
        return _oauth_error(400, "invalid_request", "missing grant_type")
    if grant == "refresh_token":
        refresh = params.get("refresh_token", "")
        if not refresh:
            return _oauth_error(400, "invalid_request", "missing refresh_token")
        renewed = await credentials.refresh_access_token(refresh, ttl)
        if renewed is None:
            return _oauth_error(400, "invalid_grant", "invalid refresh token")
        return JSONResponse(_token_body(renewed, settings))
    if grant != "client_credentials":
        return _oauth_error(400, "unsupported_grant_type", "The authorization grant type is not supported")
    client_id, client_secret = params.get("client_id", ""), params.get("client_secret", "")
    if not client_id:
        return _oauth_error(401, "invalid_client", "unknown client id")
    check = await credentials.check_baidu_client(client_id, client_secret)
    if check.status == "bad_secret":
        return _oauth_error(401, "invalid_client", "Client authentication failed")
    if check.status != "ok" or check.credential is None:
        return _oauth_error(401, "invalid_client", "unknown client id")
    issued = await credentials.issue_access_token(check.credential.id, ttl)
    return JSONResponse(_token_body(issued, settings))


async def _chat(request: Request, api_name: str, services: Services) -> Response:
    settings = services.settings
    credential_id = await authenticate(request, services.credentials, settings.wenxin_signature_skew_s)
    if api_name not in settings.wenxin_api_names:
        raise WenxinError(API_NAME_NOT_EXIST, f"API name not exist: {api_name!r}", param="api_name")
    body = parse_chat_request(await request.body(), max_content_chars=settings.wenxin_max_content_chars)
    engine = services.model.get()
    job = await ChatCompletion.admit(engine, body, settings, api_key_id=credential_id)
    if body.stream:
        return StreamingResponse(
            job.events(),
            media_type="text/event-stream;charset=utf-8",
            headers={"Cache-Control": "no-cache", **_HEADERS},
        )
    try:
        result = await unless_disconnected(request, job.response())
    finally:
        job.cancel()
    return Response(dumps(result), media_type="application/json;charset=utf-8", headers=_HEADERS)


@router.post(MODEL_API_PREFIX + "/chat/{api_name}", response_model=None)
async def chat(request: Request, api_name: str, services: ServicesDep) -> Response:
    """Chat with the model served under `api_name` (Baidu's custom-model chat API). Authenticate with
    `?access_token=` from /oauth/2.0/token or a `bce-auth-v1` Authorization header. `"stream": true`
    answers with `data: {json}` events, one per sentence, the last with `"is_end": true`."""
    return await _chat(request, api_name, services)


@router.post(MODEL_API_PREFIX + "/{api_name}", response_model=None, include_in_schema=False)
async def chat_custom_endpoint(request: Request, api_name: str, services: ServicesDep) -> Response:
    """The same chat API without the `/chat/` segment (qianfan's `QIANFAN_USE_CUSTOM_ENDPOINT=true`)."""
    return await _chat(request, api_name, services)


@router.post("/wenxinworkshop/service/list", include_in_schema=False)
async def service_list() -> dict[str, Any]:
    """qianfan's console model-list lookup: nothing to add to its preset list (clients name an endpoint)."""
    return {"log_id": secrets.token_hex(8), "result": {"common": [], "custom": []}}


def error_scopes() -> list[tuple[str, ErrorRenderer]]:
    """(path, renderer) pairs for errors raised outside this dialect's routes (404, 405, 500).

    A path ending in "/" is a prefix; any other path matches exactly. More specific entries first.
    """
    return [
        ("/oauth/2.0/", RENDERER),
        ("/rpc/2.0/", RENDERER),
        ("/wenxinworkshop/service/list", RENDERER),
    ]
