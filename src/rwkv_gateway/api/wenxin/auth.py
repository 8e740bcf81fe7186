"""Who is calling: a `bce-auth-v1` signature (IAM AK/SK mode) or an OAuth `access_token`.

The IAM header wins whenever it is present (any `access_token` is then ignored), as on Baidu. A bad,
stale or future-dated signature, or an unknown AK, is code 14; a missing token 100, an unknown or
revoked one 110, an expired one 111 (qianfan refreshes its token on 110/111 and retries once). The
checks themselves are the credentials service's (`services/credentials.py`).
"""

from __future__ import annotations

from datetime import UTC, datetime

from fastapi import Request

from rwkv_gateway.api.wenxin import signature
from rwkv_gateway.api.wenxin.errors import (
    IAM_FAILED,
    INVALID_PARAMETER,
    TOKEN_EXPIRED,
    TOKEN_INVALID,
    WenxinError,
)
from rwkv_gateway.services.credentials import CredentialService


async def verify_iam(request: Request, header: str, credentials: CredentialService, skew_s: int) -> str:
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


async def authenticate(request: Request, credentials: CredentialService, skew_s: int) -> str:
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
