"""The `bce-auth-v1` request signature, computed exactly as Baidu's bce-python-sdk 0.9.79 signer does.

Pure functions, no framework: canonical URI, query and headers, the signing key (an HMAC of the auth
string prefix keyed by the SK) and the signature (an HMAC of the canonical request keyed by the
signing key's *hex text*), the `Authorization` header's parsing and building, and the time window.
The server recomputes the signature from the values it received (Host as sent, query as parsed) and
compares in constant time; the body is not signed.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

PREFIX = "bce-auth-v1"
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
#: Signed when the header names no signed headers (`.../{exp}//{sig}`), besides every `x-bce-*` one.
DEFAULT_SIGNED = ("host", "content-length", "content-type", "content-md5")
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


class SignatureError(ValueError):
    """The Authorization header is malformed, stale, from the future, or does not match."""


def uri_encode(value: str, *, keep_slash: bool = False) -> str:
    """Percent-encode every UTF-8 byte except A-Z a-z 0-9 - . _ ~ (and "/" if asked), uppercase hex."""
    out: list[str] = []
    for byte in value.encode("utf-8"):
        if byte in _UNRESERVED or (keep_slash and byte == ord("/")):
            out.append(chr(byte))
        else:
            out.append(f"%{byte:02X}")
    return "".join(out)


def canonical_uri(path: str) -> str:
    return uri_encode(path, keep_slash=True)


def canonical_query(params: Iterable[tuple[str, str]]) -> str:
    """`k=v` pairs (both encoded, a value-less key gives `k=`), sorted, joined by "&".

    The bce SDK means to leave out a parameter named `authorization` but never does (it compares a
    bytes key with a str); this follows what it actually signs, so no parameter is left out.
    """
    return "&".join(sorted(f"{uri_encode(k)}={uri_encode(v)}" for k, v in params))


def canonical_headers(headers: Mapping[str, str], signed: Iterable[str] | None) -> str:
    """`name:value` lines of the signed headers that have a value (names lowercased, both trimmed and
    encoded), sorted and joined by "\\n". `signed` None (an empty list in the header): the default set.

    `headers` maps lowercase names to values. Raises SignatureError if a named header is absent.
    """
    lines: list[str] = []
    if signed is None:
        names = [n for n in headers if n in DEFAULT_SIGNED or n.startswith("x-bce-")]
    else:
        names = [n.strip().lower() for n in signed]
        missing = [n for n in names if n not in headers]
        if missing:
            raise SignatureError(f"signed header {missing[0]!r} is not in the request")
    for name in names:
        value = headers[name].strip()
        if value:
            lines.append(f"{uri_encode(name)}:{uri_encode(value)}")
    return "\n".join(sorted(lines))


def canonical_request(method: str, path: str, query: str, headers: str) -> str:
    return f"{method.upper()}\n{canonical_uri(path)}\n{query}\n{headers}"


def auth_string_prefix(access_key: str, timestamp: str, expiration_s: int) -> str:
    return f"{PREFIX}/{access_key}/{timestamp}/{expiration_s}"


def _hmac_hex(key: str, message: str) -> str:
    return hmac.new(key.encode("utf-8"), message.encode("utf-8"), hashlib.sha256).hexdigest()


def signing_key(secret_key: str, prefix: str) -> str:
    return _hmac_hex(secret_key, prefix)


def signature(secret_key: str, prefix: str, canonical: str) -> str:
    # The second HMAC is keyed by the signing key's lowercase hex text, not its raw bytes.
    return _hmac_hex(signing_key(secret_key, prefix), canonical)


def format_timestamp(when: datetime) -> str:
    return when.astimezone(UTC).strftime(TIME_FORMAT)


@dataclass(frozen=True, slots=True)
class Authorization:
    """A parsed `bce-auth-v1/{ak}/{timestamp}/{expiration}/{signedHeaders}/{signature}` header."""

    access_key: str
    timestamp: str
    expiration_s: int
    #: Lowercase header names in the order given; None when the header listed none (default set).
    signed_headers: tuple[str, ...] | None
    signature: str

    @property
    def prefix(self) -> str:
        return auth_string_prefix(self.access_key, self.timestamp, self.expiration_s)

    def signed_at(self) -> datetime:
        try:
            return datetime.strptime(self.timestamp, TIME_FORMAT).replace(tzinfo=UTC)
        except ValueError:
            raise SignatureError(f"bad timestamp {self.timestamp!r}") from None


def parse_authorization(header: str) -> Authorization:
    parts = header.strip().split("/")
    if len(parts) != 6 or parts[0] != PREFIX:
        raise SignatureError("the Authorization header is not bce-auth-v1/ak/timestamp/exp/headers/sig")
    _, ak, timestamp, expiration, signed, sig = parts
    if not ak or not sig or not expiration.isdecimal():
        raise SignatureError("the Authorization header has an empty or malformed part")
    names = tuple(n.strip().lower() for n in signed.split(";")) if signed else None
    return Authorization(ak, timestamp, int(expiration), names, sig)


def sign(
    access_key: str,
    secret_key: str,
    method: str,
    path: str,
    query: Iterable[tuple[str, str]],
    headers: Mapping[str, str],
    *,
    timestamp: str,
    expiration_s: int = 1800,
    signed_headers: Iterable[str] | None = None,
) -> str:
    """The Authorization header value for a request (what a client sends; tests use it).

    `headers` maps lowercase names to values; `signed_headers` None signs the default set and leaves
    the header's list empty.
    """
    names = None if signed_headers is None else tuple(n.lower() for n in signed_headers)
    canonical = canonical_request(method, path, canonical_query(query), canonical_headers(headers, names))
    prefix = auth_string_prefix(access_key, timestamp, expiration_s)
    listed = ";".join(names) if names is not None else ""
    return f"{prefix}/{listed}/{signature(secret_key, prefix, canonical)}"


def check_window(auth: Authorization, now: datetime, max_skew_s: int) -> None:
    """Refuse a signature whose window has passed or whose timestamp lies too far ahead."""
    signed_at = auth.signed_at().timestamp()
    current = now.timestamp()
    if current > signed_at + auth.expiration_s:
        raise SignatureError("the signature has expired")
    if signed_at > current + max_skew_s:
        raise SignatureError("the signature's timestamp is in the future")


def verify(
    auth: Authorization,
    secret_key: str,
    method: str,
    path: str,
    query: Iterable[tuple[str, str]],
    headers: Mapping[str, str],
) -> None:
    """Recompute the signature from the received request; raise SignatureError if it differs."""
    canonical = canonical_request(
        method, path, canonical_query(query), canonical_headers(headers, auth.signed_headers)
    )
    expected = signature(secret_key, auth.prefix, canonical)
    if not hmac.compare_digest(expected.encode(), auth.signature.lower().encode()):
        raise SignatureError("the signature does not match")
