"""Helpers for the wenxinworkshop wire tests: a served app with a Baidu AK/SK pair and its token, and
IAM-signed request headers made the way qianfan makes them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx

from rwkv_gateway.api.wenxin import signature

if TYPE_CHECKING:
    from tests.api.conftest import Served

CHAT = "/rpc/2.0/ai_custom/v1/wenxinworkshop/chat/rwkv"
TOKEN = "/oauth/2.0/token"


@dataclass(slots=True)
class Wenxin:
    """A served app, one Baidu credential (AK/SK) and an access token issued for it over HTTP."""

    served: Served
    ak: str
    sk: str
    token: str
    credential_id: int

    @property
    def client(self) -> httpx.AsyncClient:
        return self.served.client

    async def chat(
        self, body: dict[str, Any], *, path: str = CHAT, token: str | None = None
    ) -> httpx.Response:
        return await self.client.post(
            f"{path}?access_token={self.token if token is None else token}", json=body
        )

    def signed_headers(
        self,
        path: str,
        *,
        query: list[tuple[str, str]] | None = None,
        timestamp: str,
        expiration_s: int = 1800,
        sk: str | None = None,
        ak: str | None = None,
        host: str = "test",
    ) -> dict[str, str]:
        """Headers for an IAM-signed POST, signed the way qianfan does it (content-type, host, x-bce-date)."""
        headers = {"content-type": "application/json", "host": host, "x-bce-date": timestamp}
        auth = signature.sign(
            ak or self.ak,
            sk or self.sk,
            "POST",
            urlsplit(path).path,
            query or [],
            headers,
            timestamp=timestamp,
            expiration_s=expiration_s,
            signed_headers=["x-bce-date", "host", "content-type"],
        )
        return {**headers, "authorization": auth}


async def make_wenxin(served: Served) -> Wenxin:
    created = await served.app.state.services.credentials.create("baidu", "tests")
    resp = await served.client.post(
        f"{TOKEN}?grant_type=client_credentials&client_id={created.api_key}&client_secret={created.secret_key}",
        json={},
    )
    assert resp.status_code == 200, resp.text
    return Wenxin(served, created.api_key, created.secret_key, resp.json()["access_token"], created.id)
