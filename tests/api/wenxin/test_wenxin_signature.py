"""bce-auth-v1 canonicalisation and signing against the vectors made with Baidu's own signer."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from rwkv_gateway.api.wenxin import signature as s

AK, SK, TS = "iam-ak", "iam-sk", "2023-11-14T22:13:20Z"
PATH = "/rpc/2.0/ai_custom/v1/wenxinworkshop/chat/my_rwkv"
HEADERS = {"content-type": "application/json", "host": "127.0.0.1:8000", "x-bce-date": TS}
PREFIX = "bce-auth-v1/iam-ak/2023-11-14T22:13:20Z/1800"
V1_CANONICAL = (
    "POST\n/rpc/2.0/ai_custom/v1/wenxinworkshop/chat/my_rwkv\n\ncontent-type:application%2Fjson\n"
    "host:127.0.0.1%3A8000\nx-bce-date:2023-11-14T22%3A13%3A20Z"
)
V1 = (
    "bce-auth-v1/iam-ak/2023-11-14T22:13:20Z/1800/content-type;host;x-bce-date/"
    "b1942fdbf5824433219ef1580f46503cbfaa2230f09e0d9583d28a3450d594f4"
)
V2_QUERY = [("access_token", ""), ("foo", "a b/c")]
V2 = (
    "bce-auth-v1/iam-ak/2023-11-14T22:13:20Z/1800//"
    "97971ee63fdd569119948b207937ae47825ff9aaf5a101744fb1b8fe6d346d34"
)


def test_v1_signing_key_canonical_request_and_header() -> None:
    assert s.auth_string_prefix(AK, TS, 1800) == PREFIX
    assert s.signing_key(SK, PREFIX) == "9c2a9c744ed0637ebbd34499b7dc9015f580057ce3d53622ba67820bd7b128c5"
    canonical = s.canonical_request(
        "post",
        PATH,
        s.canonical_query([]),
        s.canonical_headers(HEADERS, ["content-type", "host", "x-bce-date"]),
    )
    assert canonical == V1_CANONICAL
    signed = s.sign(
        AK, SK, "POST", PATH, [], HEADERS, timestamp=TS, signed_headers=["content-type", "host", "x-bce-date"]
    )
    assert signed == V1


def test_v2_default_header_set_and_query() -> None:
    assert s.canonical_query(V2_QUERY) == "access_token=&foo=a%20b%2Fc"
    # The default set is host, content-length, content-type, content-md5 and x-bce-*; others are left out.
    headers = {**HEADERS, "request_id": "sdk-py-0.4.12.3-abc", "user-agent": "x"}
    assert s.canonical_headers(headers, None) == s.canonical_headers(HEADERS, None)
    assert s.sign(AK, SK, "POST", PATH, V2_QUERY, headers, timestamp=TS) == V2


def test_signed_headers_in_any_order_give_the_same_signature() -> None:
    # qianfan lists its signed headers in set order; only the canonical lines are sorted.
    auth = s.parse_authorization(
        s.sign(
            AK,
            SK,
            "POST",
            PATH,
            [],
            HEADERS,
            timestamp=TS,
            signed_headers=["x-bce-date", "host", "content-type"],
        )
    )
    assert auth.signature == V1.rsplit("/", 1)[1]
    assert auth.signed_headers == ("x-bce-date", "host", "content-type")
    s.verify(auth, SK, "POST", PATH, [], HEADERS)


def test_uri_encode_keeps_only_unreserved_bytes_with_uppercase_hex() -> None:
    assert s.uri_encode("aZ09-._~") == "aZ09-._~"
    assert s.uri_encode("a b/c:d") == "a%20b%2Fc%3Ad"
    assert s.uri_encode("你") == "%E4%BD%A0"
    assert s.canonical_uri("/a b/c") == "/a%20b/c"


def test_parse_authorization() -> None:
    auth = s.parse_authorization(V2)
    assert (auth.access_key, auth.timestamp, auth.expiration_s, auth.signed_headers) == (AK, TS, 1800, None)
    assert auth.signed_at() == datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)
    for bad in [
        "bce-auth-v1/ak/ts/1800/host",
        "bce-auth-v2/a/b/1/h/s",
        "bce-auth-v1//t/1/h/s",
        "bce-auth-v1/a/t/x/h/s",
    ]:
        with pytest.raises(s.SignatureError):
            s.parse_authorization(bad)
    with pytest.raises(s.SignatureError, match="timestamp"):
        s.parse_authorization("bce-auth-v1/a/yesterday/1800/host/abc").signed_at()


def test_verify_rejects_changed_values_and_missing_signed_headers() -> None:
    auth = s.parse_authorization(V1)
    s.verify(auth, SK, "POST", PATH, [], HEADERS)
    for secret, method, path, query, headers in [
        ("other-sk", "POST", PATH, [], HEADERS),
        (SK, "GET", PATH, [], HEADERS),
        (SK, "POST", PATH + "x", [], HEADERS),
        (SK, "POST", PATH, [("a", "1")], HEADERS),
        (SK, "POST", PATH, [], {**HEADERS, "host": "127.0.0.1:8001"}),
    ]:
        with pytest.raises(s.SignatureError, match="does not match"):
            s.verify(auth, secret, method, path, query, headers)
    without_host = {k: v for k, v in HEADERS.items() if k != "host"}
    with pytest.raises(s.SignatureError, match="'host' is not in the request"):
        s.verify(auth, SK, "POST", PATH, [], without_host)


def test_time_window() -> None:
    auth = s.parse_authorization(V1)  # signed at TS for 1800 s
    at = auth.signed_at()
    s.check_window(auth, at + timedelta(seconds=1800), 300)
    with pytest.raises(s.SignatureError, match="expired"):
        s.check_window(auth, at + timedelta(seconds=1801), 300)
    s.check_window(auth, at - timedelta(seconds=300), 300)
    with pytest.raises(s.SignatureError, match="future"):
        s.check_window(auth, at - timedelta(seconds=301), 300)
    assert s.format_timestamp(at) == TS
