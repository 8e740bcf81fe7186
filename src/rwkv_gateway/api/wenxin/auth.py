"""Who is calling: a `bce-auth-v1` signature (IAM AK/SK mode) or an OAuth `access_token`.

The IAM header wins whenever it is present (any `access_token` is then ignored), as on Baidu. A bad,
stale or future-dated signature, or an unknown AK, is code 14; a missing token 100, an unknown or
revoked one 110, an expired one 111 (qianfan refreshes its token on 110/111 and retries once). The
credential store is seen through the `BaiduCredentials` protocol: the dialect never imports the
service module, which would pull the database layer into `api/`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Protocol

from fastapi import Request

from rwkv_gateway.api.wenxin import signature
from rwkv_gateway.api.wenxin.errors import (
    IAM_FAILED,
    INVALID_PARAMETER,
    TOKEN_EXPIRED,
    TOKEN_INVALID,
    WenxinError,
)


class CredentialRef(Protocol):
    @property
    def id(self) -> int: ...


class ClientCheck(Protocol):
    @property
    def status(self) -> str: ...

    @property
    def credential(self) -> CredentialRef | None: ...


class IssuedTokenLike(Protocol):
    @property
    def access_token(self) -> str: ...

    @property
    def refresh_token(self) -> str: ...

    @property
    def expires_in(self) -> int: ...


class BaiduCredentials(Protocol):
    """What this dialect uses of the credentials service (`app.state.credentials`)."""

    async def baidu_secret(self, access_key: str) -> str | None: ...

    async def check_baidu_client(self, client_id: str, client_secret: str) -> ClientCheck: ...

    async def check_access_token(self, token: str) -> ClientCheck: ...

    async def issue_access_token(self, credential_id: int, ttl_s: int = ...) -> IssuedTokenLike: ...

    async def refresh_access_token(self, refresh_token: str, ttl_s: int = ...) -> IssuedTokenLike | None: ...


def get_credentials(request: Request) -> BaiduCredentials:
    credentials: BaiduCredentials = request.app.state.credentials
    return credentials


async def verify_iam(request: Request, header: str, credentials: BaiduCredentials, skew_s: int) -> str:
    """The id of the credential whose SK signed this request; WenxinError(14) otherwise."""
    try:
        auth = signature.parse_authorization(header)
        signature.check_window(auth, datetime.now(UTC), skew_s)
        secret = await credentials.baidu_secret(auth.access_key)
        if secret is None:
            raise signature.SignatureError("unknown access key")
        # Recomputed from what was received: the Host header as sent, the query as parsed.
        headers = {name.lower(): value for name, value in request.headers.items()}
        query = request.query_params.multi_items()
        signature.verify(auth, secret, request.method, request.url.path, query, headers)
    except signature.SignatureError:
        raise WenxinError(IAM_FAILED) from None
    check = await credentials.check_baidu_client(auth.access_key, secret)
    if check.credential is None:  # revoked between the two lookups
        raise WenxinError(IAM_FAILED)
    return str(check.credential.id)


async def authenticate(request: Request, credentials: BaiduCredentials, skew_s: int) -> str:
    """The id of the credential behind the request (IAM signature first, else `access_token`)."""
    header = request.headers.get("authorization", "").strip()
    if header.startswith(signature.PREFIX + "/"):
        return await verify_iam(request, header, credentials, skew_s)
    token = request.query_params.get("access_token", "").strip()
    if not token:
        raise WenxinError(INVALID_PARAMETER, "Invalid parameter: access_token is missing")
    check = await credentials.check_access_token(token)
    if check.status == "expired":
        raise WenxinError(TOKEN_EXPIRED)
    if check.status != "ok" or check.credential is None:
        raise WenxinError(TOKEN_INVALID)
    return str(check.credential.id)
