"""The wenxinworkshop dialect on the wire through the real app (lifespan, migrations, engine, SQLite):
the token endpoint, both ways of authenticating, every body rule with its Baidu code, the response and
stream shapes, greedy output equal to the engine's, the prefix cache across turns, busy and faults."""

from __future__ import annotations

import dataclasses
import json
import re
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from wenxin_support import CHAT, TOKEN, Wenxin, make_wenxin

from rwkv_gateway.api.common.deps import Services
from rwkv_gateway.api.wenxin import signature
from rwkv_gateway.api.wenxin.serving import _SENTENCE_END, MAX_PIECE_CHARS
from rwkv_gateway.db.repo import RequestLogRepo
from rwkv_gateway.db.session import SqlStorage
from rwkv_gateway.domain.prompts import ChatMessage, ChatTemplate
from rwkv_gateway.domain.types import GenerationRequest, SamplingParams
from rwkv_gateway.engine import admission as admission_mod
from rwkv_gateway.engine.sampler import Sampler
from rwkv_gateway.engine.tokenizer import Tokenizer
from rwkv_gateway.services.credentials import CredentialService
from support import idle

if TYPE_CHECKING:
    from tests.api.conftest import ServeFactory
    from tests.conftest import FullQueue

PREFIX = "/rpc/2.0/ai_custom/v1/wenxinworkshop"
HELLO = [{"role": "user", "content": "Hello, who are you?"}]
FAULT_PENALTY = 1.234  # marks the request a fault-injecting sampler acts on


def greedy(**fields: Any) -> dict[str, Any]:
    return {"messages": HELLO, "top_k": 1, "max_output_tokens": 12, **fields}


def assert_error(resp: httpx.Response, code: int, *, contains: str | None = None) -> str:
    """An error is HTTP 200 with exactly error_code and error_msg, on one JSON line."""
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    assert "\n" not in resp.text
    body = resp.json()
    assert set(body) == {"error_code", "error_msg"}, body
    assert body["error_code"] == code, body
    message = body["error_msg"]
    assert isinstance(message, str) and message
    if contains is not None:
        assert contains in message, message
    return str(message)


def assert_ok(resp: httpx.Response) -> dict[str, Any]:
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    assert "error_code" not in body, body
    return body


def stream_events(resp: httpx.Response) -> list[dict[str, Any]]:
    """The events of a wenxin stream, checking the framing: `data: {json}` + blank line, nothing else."""
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "text/event-stream;charset=utf-8"
    assert resp.headers["cache-control"] == "no-cache"
    body = resp.text
    assert body.endswith("\n\n") and "\r" not in body and "[DONE]" not in body
    frames = body.split("\n\n")
    assert frames[-1] == ""
    events = []
    for frame in frames[:-1]:
        assert frame.startswith("data: {"), f"not a data event: {frame!r}"
        assert "\n" not in frame, f"multi-line event: {frame!r}"
        events.append(json.loads(frame[len("data: ") :]))
    return events


async def engine_greedy(wx: Wenxin, messages: list[ChatMessage], max_tokens: int, **sampling: Any) -> str:
    """What the engine itself says for the same chat prompt, submitted directly."""
    template = ChatTemplate()
    stream = await wx.served.app.state.services.model.engine.submit(
        GenerationRequest(
            prompt_segments=template.segments(messages),
            sampling=SamplingParams(**{"temperature": 0.0, **sampling}),
            max_tokens=max_tokens,
            stop=template.stops,
            dialect="test",
        )
    )
    text, _ = await stream.collect()
    return text.strip()


def now_ts(offset_s: float = 0) -> str:
    return signature.format_timestamp(datetime.now(UTC) + timedelta(seconds=offset_s))


# ---------------------------------------------------------------------------- /oauth/2.0/token


async def test_token_endpoint_success_shape(wx: Wenxin) -> None:
    url = f"{TOKEN}?grant_type=client_credentials&client_id={wx.ak}&client_secret={wx.sk}"
    for resp in (await wx.client.post(url, json={}), await wx.client.get(url)):
        assert resp.status_code == 200
        body = resp.json()
        assert set(body) == {
            "access_token",
            "expires_in",
            "refresh_token",
            "scope",
            "session_key",
            "session_secret",
        }
        assert body["expires_in"] == 2_592_000
        assert re.fullmatch(rf"24\.[0-9a-f]{{32}}\.2592000\.\d+\.0-{wx.credential_id}", body["access_token"])
        assert re.fullmatch(
            rf"25\.[0-9a-f]{{32}}\.315360000\.\d+\.0-{wx.credential_id}", body["refresh_token"]
        )
        assert body["scope"].split() == ["public", "ai_custom_rwkv"]
        assert_ok(await wx.chat(greedy(max_output_tokens=1), token=body["access_token"]))


async def test_token_from_a_form_body_and_json_bodies_are_ignored(wx: Wenxin) -> None:
    form = {"grant_type": "client_credentials", "client_id": wx.ak, "client_secret": wx.sk}
    resp = await wx.client.post(TOKEN, data=form)
    assert resp.status_code == 200 and resp.json()["access_token"].startswith("24.")
    resp = await wx.client.post(TOKEN, json=form)
    assert resp.status_code == 400
    assert resp.json() == {"error": "invalid_request", "error_description": "missing grant_type"}


@pytest.mark.parametrize(
    ("query", "status", "error", "description"),
    [
        ("grant_type=client_credentials&client_id={ak}&client_secret=wrong", 401, "invalid_client",
         "Client authentication failed"),
        ("grant_type=client_credentials&client_id=nobody&client_secret={sk}", 401, "invalid_client",
         "unknown client id"),
        ("grant_type=client_credentials&client_secret={sk}", 401, "invalid_client", "unknown client id"),
        ("grant_type=password&client_id={ak}&client_secret={sk}", 400, "unsupported_grant_type",
         "The authorization grant type is not supported"),
        ("client_id={ak}&client_secret={sk}", 400, "invalid_request", "missing grant_type"),
        ("grant_type=refresh_token", 400, "invalid_request", "missing refresh_token"),
        ("grant_type=refresh_token&refresh_token=25.nope", 400, "invalid_grant", "invalid refresh token"),
    ],
)  # fmt: skip
async def test_token_endpoint_errors_use_the_oauth_shape(
    wx: Wenxin, query: str, status: int, error: str, description: str
) -> None:
    resp = await wx.client.post(f"{TOKEN}?{query.format(ak=wx.ak, sk=wx.sk)}", json={})
    assert resp.status_code == status
    assert resp.json() == {"error": error, "error_description": description}


async def test_refresh_token_grant_renews_once(wx: Wenxin) -> None:
    first = (
        await wx.client.post(f"{TOKEN}?grant_type=client_credentials&client_id={wx.ak}&client_secret={wx.sk}")
    ).json()
    renewed = await wx.client.post(f"{TOKEN}?grant_type=refresh_token&refresh_token={first['refresh_token']}")
    assert renewed.status_code == 200
    assert_ok(await wx.chat(greedy(max_output_tokens=1), token=renewed.json()["access_token"]))
    again = await wx.client.post(f"{TOKEN}?grant_type=refresh_token&refresh_token={first['refresh_token']}")
    assert again.json()["error"] == "invalid_grant"


async def test_token_ttl_setting(serve: ServeFactory) -> None:
    wx = await make_wenxin(await serve(wenxin_token_ttl_s=60))
    resp = await wx.client.get(
        f"{TOKEN}?grant_type=client_credentials&client_id={wx.ak}&client_secret={wx.sk}"
    )
    assert resp.json()["expires_in"] == 60
    assert ".60." in resp.json()["access_token"]


# ---------------------------------------------------------------------------- access tokens


async def test_missing_unknown_expired_and_revoked_tokens(wx: Wenxin) -> None:
    resp = await wx.client.post(CHAT, json=greedy())
    assert_error(resp, 100, contains="access_token")
    assert_error(await wx.chat(greedy(), token=""), 100)
    assert_error(await wx.chat(greedy(), token="24.0123456789abcdef0123456789abcdef.2592000.1.0-1"), 110)
    assert_error(await wx.chat(greedy(), token="garbage"), 110)
    # A refresh token is not an access token.
    issued = (
        await wx.client.get(f"{TOKEN}?grant_type=client_credentials&client_id={wx.ak}&client_secret={wx.sk}")
    ).json()
    assert_error(await wx.chat(greedy(), token=issued["refresh_token"]), 110)

    # Expired: the same credentials service, its clock moved past the token's lifetime.
    app = wx.served.app
    services: Services = app.state.services
    real = services.credentials
    later = datetime.now(UTC) + timedelta(seconds=2_592_001)
    late = CredentialService(SqlStorage(services.storage.sessions), clock=lambda: later)
    app.state.services = dataclasses.replace(services, credentials=late)
    try:
        assert_error(await wx.chat(greedy()), 111, contains="Access token expired")
    finally:
        app.state.services = services
    assert_ok(await wx.chat(greedy(max_output_tokens=1)))

    assert await real.revoke(wx.ak)
    assert_error(await wx.chat(greedy()), 110, contains="Access token invalid or no longer valid")
    # A revoked AK/SK gets no new token either.
    resp = await wx.client.get(
        f"{TOKEN}?grant_type=client_credentials&client_id={wx.ak}&client_secret={wx.sk}"
    )
    assert resp.status_code == 401


# ---------------------------------------------------------------------------- IAM signatures


async def test_iam_signed_request_succeeds_without_a_token(wx: Wenxin) -> None:
    headers = wx.signed_headers(CHAT, timestamp=now_ts())
    resp = await wx.client.post(CHAT, json=greedy(), headers=headers)
    body = assert_ok(resp)
    assert body["result"] == assert_ok(await wx.chat(greedy()))["result"]


async def test_iam_signature_covers_the_query_string(wx: Wenxin) -> None:
    query = [("foo", "a b/c"), ("empty", "")]
    headers = wx.signed_headers(CHAT, query=query, timestamp=now_ts())
    url = httpx.URL(CHAT, params=query)
    assert_ok(await wx.client.post(url, json=greedy(max_output_tokens=1), headers=headers))
    other = httpx.URL(CHAT, params=[("foo", "a b/d"), ("empty", "")])
    assert_error(await wx.client.post(other, json=greedy(), headers=headers), 14)


async def test_iam_failures_are_code_14(wx: Wenxin) -> None:
    cases = {
        "wrong secret": wx.signed_headers(CHAT, timestamp=now_ts(), sk="x" * 32),
        "unknown access key": wx.signed_headers(CHAT, timestamp=now_ts(), ak="nobody"),
        "stale timestamp": wx.signed_headers(CHAT, timestamp=now_ts(-1900), expiration_s=1800),
        "future timestamp": wx.signed_headers(CHAT, timestamp=now_ts(+600)),
        "other host": {**wx.signed_headers(CHAT, timestamp=now_ts(), host="elsewhere:8000"), "host": "test"},
        "other path": wx.signed_headers(PREFIX + "/chat/other", timestamp=now_ts()),
        "malformed": {"authorization": "bce-auth-v1/only/three"},
    }
    for what, headers in cases.items():
        resp = await wx.client.post(CHAT, json=greedy(), headers=headers)
        assert resp.json().get("error_code") == 14, what
        assert_error(resp, 14, contains="IAM Certification failed")
    # A signed header that the request lacks.
    headers = wx.signed_headers(CHAT, timestamp=now_ts())
    ak_part, rest = headers["authorization"].split("/x-bce-date;host;content-type/")
    headers["authorization"] = f"{ak_part}/request_id;x-bce-date;host;content-type/{rest}"
    assert_error(await wx.client.post(CHAT, json=greedy(), headers=headers), 14)


async def test_a_stale_signature_within_its_own_longer_expiration_is_fine(wx: Wenxin) -> None:
    headers = wx.signed_headers(CHAT, timestamp=now_ts(-1900), expiration_s=3600)
    assert_ok(await wx.client.post(CHAT, json=greedy(max_output_tokens=1), headers=headers))


async def test_the_iam_header_wins_over_a_valid_token(wx: Wenxin) -> None:
    headers = wx.signed_headers(CHAT, timestamp=now_ts(), sk="x" * 32)
    resp = await wx.client.post(f"{CHAT}?access_token={wx.token}", json=greedy(), headers=headers)
    assert_error(resp, 14)


async def test_revoked_iam_credentials_are_refused(wx: Wenxin) -> None:
    assert await wx.served.app.state.services.credentials.revoke(wx.ak)
    assert_error(
        await wx.client.post(CHAT, json=greedy(), headers=wx.signed_headers(CHAT, timestamp=now_ts())), 14
    )


# ---------------------------------------------------------------------------- api_name and paths


async def test_unknown_api_name_is_336005_after_auth(wx: Wenxin) -> None:
    assert_error(await wx.chat(greedy(), path=PREFIX + "/chat/ernie"), 336005, contains="ernie")
    assert_error(await wx.chat(greedy(), path=PREFIX + "/chat/ernie", token="bad"), 110)


async def test_configured_api_names_and_the_custom_endpoint_path(serve: ServeFactory) -> None:
    wx = await make_wenxin(await serve(wenxin_api_names=["my_rwkv", "ernie-like"]))
    for name in ("my_rwkv", "ernie-like"):
        assert_ok(await wx.chat(greedy(max_output_tokens=1), path=f"{PREFIX}/chat/{name}"))
    assert_ok(await wx.chat(greedy(max_output_tokens=1), path=f"{PREFIX}/my_rwkv"))  # USE_CUSTOM_ENDPOINT
    assert_error(await wx.chat(greedy(), path=f"{PREFIX}/chat/rwkv"), 336005)


async def test_methods_and_unknown_paths_inside_the_prefixes(wx: Wenxin) -> None:
    assert_error(
        await wx.client.get(f"{CHAT}?access_token={wx.token}"), 336101, contains="Invalid HTTP Method"
    )
    assert_error(await wx.client.put(TOKEN), 336101)
    assert_error(await wx.client.post("/rpc/2.0/nothing/here"), 3)
    assert_error(await wx.client.get("/oauth/2.0/authorize"), 3)


async def test_console_model_list_lookup(wx: Wenxin) -> None:
    resp = await wx.client.post("/wenxinworkshop/service/list", json={})
    body = resp.json()
    assert resp.status_code == 200 and body["result"] == {"common": [], "custom": []}
    assert isinstance(body["log_id"], str)


async def test_openapi_documents_the_routes(wx: Wenxin) -> None:
    resp = await wx.client.get("/openapi.json")  # filterwarnings=error: no duplicate operation ids either
    paths = resp.json()["paths"]
    assert set(paths["/oauth/2.0/token"]) == {"get", "post"}
    assert set(paths[CHAT.replace("/rwkv", "/{api_name}")]) == {"post"}


# ---------------------------------------------------------------------------- body validation

BAD_BODIES: list[tuple[Any, int, str]] = [
    ({}, 336001, "messages"),
    ({"messages": "hi"}, 336001, "messages"),
    ({"messages": None}, 336001, "messages"),
    ({"messages": []}, 336006, "messages"),
    ({"messages": [*HELLO, {"role": "assistant", "content": "hi"}]}, 336006, "odd number"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, 336006, "messages[0].role"),
    ({"messages": [{"role": "system", "content": "hi"}]}, 336006, "even index"),
    ({"messages": [*HELLO, {"role": "user", "content": "a"}, *HELLO]}, 336006, "messages[1].role"),
    ({"messages": ["hi"]}, 336003, "messages[0]"),
    ({"messages": [{"role": "user", "content": ""}]}, 336003, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "  \n"}]}, 336003, "content can not be empty"),
    ({"messages": [{"role": "user"}]}, 336003, "messages[0].content"),
    ({"messages": [{"role": "user", "content": 5}]}, 336003, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "x" * 4801}]}, 336103, "Prompt tokens too long"),
    ({"messages": HELLO, "system": "s" * 4800}, 336103, "4800"),
    ({"messages": HELLO, "stream": "yes"}, 336003, "stream"),
    ({"messages": HELLO, "temperature": 0}, 336003, "temperature"),
    ({"messages": HELLO, "temperature": 1.01}, 336003, "temperature"),
    ({"messages": HELLO, "temperature": "0.5"}, 336003, "temperature"),
    ({"messages": HELLO, "top_k": -1}, 336003, "top_k"),
    ({"messages": HELLO, "top_k": 1.5}, 336003, "top_k"),
    ({"messages": HELLO, "top_p": 1.1}, 336003, "top_p"),
    ({"messages": HELLO, "top_p": -0.1}, 336003, "top_p"),
    ({"messages": HELLO, "penalty_score": 0.99}, 336003, "penalty_score"),
    ({"messages": HELLO, "penalty_score": 2.01}, 336003, "penalty_score"),
    ({"messages": HELLO, "stop": ["a", "b", "c", "d", "e"]}, 336003, "stop"),
    ({"messages": HELLO, "stop": ["x" * 21]}, 336003, "stop"),
    ({"messages": HELLO, "stop": [""]}, 336003, "stop"),
    ({"messages": HELLO, "stop": "abc"}, 336003, "stop"),
    ({"messages": HELLO, "user_id": 5}, 336003, "user_id"),
    ({"messages": HELLO, "metadata": {f"k{i}": "v" for i in range(17)}}, 336003, "metadata"),
    ({"messages": HELLO, "metadata": {"k": 1}}, 336003, "metadata.k"),
    ({"messages": HELLO, "system": ["x"]}, 336003, "system"),
    ({"messages": HELLO, "max_output_tokens": 0}, 336003, "max_output_tokens"),
    ({"messages": HELLO, "max_output_tokens": "5"}, 336003, "max_output_tokens"),
    ({"messages": HELLO, "max_output_tokens": 4097}, 336003, "max_output_tokens"),
    ([HELLO], 336001, "object"),
]


@pytest.mark.parametrize(("body", "code", "names"), BAD_BODIES)
async def test_every_body_rule_has_its_code_and_names_the_field(
    wx: Wenxin, body: Any, code: int, names: str
) -> None:
    for stream in (False, True):
        if stream and isinstance(body, dict) and "stream" not in body:
            body = {**body, "stream": True}
        assert_error(await wx.chat(body), code, contains=names)


async def test_body_that_is_not_json_is_336002(wx: Wenxin) -> None:
    resp = await wx.client.post(f"{CHAT}?access_token={wx.token}", content=b"{not json")
    assert_error(resp, 336002, contains="Invalid JSON")
    resp = await wx.client.post(f"{CHAT}?access_token={wx.token}", content=b"\xff\xfe")
    assert_error(resp, 336002)


async def test_content_limit_setting(serve: ServeFactory) -> None:
    wx = await make_wenxin(await serve(wenxin_max_content_chars=10))
    assert_ok(await wx.chat({"messages": [{"role": "user", "content": "x" * 10}], "max_output_tokens": 1}))
    assert_error(await wx.chat({"messages": [{"role": "user", "content": "x" * 11}]}), 336103)


async def test_prompt_over_max_prompt_tokens_is_336103(serve: ServeFactory) -> None:
    wx = await make_wenxin(await serve(max_prompt_tokens=16))
    assert_ok(await wx.chat({"messages": [{"role": "user", "content": "hi"}], "max_output_tokens": 1}))
    resp = await wx.chat({"messages": [{"role": "user", "content": "word " * 40}]})
    message = assert_error(resp, 336103, contains="Prompt tokens too long")
    assert "the limit is 16" in message


async def test_boundary_values_and_unknown_fields_are_accepted(wx: Wenxin) -> None:
    body = {
        "messages": [
            *HELLO,
            {"role": "assistant", "content": "I am RWKV."},
            {"role": "function", "content": "42", "name": "f"},
        ],
        "temperature": 1.0,
        "top_p": 0,
        "top_k": 0,
        "penalty_score": 2.0,
        "stop": ["y" * 20, "a", "b", "c"],
        "user_id": "u-1",
        "metadata": {f"k{i}": "v" for i in range(16)},
        "system": "You are terse.",
        "max_output_tokens": 1,
        "extra_parameters": {"request_source": "qianfan_py_sdk_v0.4.12.3"},
        "disable_search": True,
        "anything": [1, 2, 3],
    }
    assert_ok(await wx.chat(body))
    assert_ok(await wx.chat({**body, "temperature": 1e-3, "top_p": 1.0, "penalty_score": 1.0}))


async def test_oversized_body_is_a_baidu_error(serve: ServeFactory) -> None:
    wx = await make_wenxin(await serve(max_body_bytes=2048))
    resp = await wx.chat({"messages": [{"role": "user", "content": "x" * 3000}]})
    assert_error(resp, 336003, contains="2048")
    resp = await wx.client.post(f"{TOKEN}?grant_type=client_credentials", content=b"a=" + b"x" * 3000,
                                headers={"content-type": "application/x-www-form-urlencoded"})  # fmt: skip
    assert_error(resp, 336003)


async def test_unexpected_failures_and_model_loading_are_baidu_errors(wx: Wenxin) -> None:
    app = wx.served.app
    services: Services = app.state.services

    class Broken:  # fault injection: the credential store blows up
        async def check_access_token(self, token: str) -> None:
            raise RuntimeError("boom")

    app.state.services = dataclasses.replace(services, credentials=Broken())
    try:
        assert_error(await wx.chat(greedy()), 1, contains="Unknown error")
    finally:
        app.state.services = services
    engine = app.state.services.model.engine
    app.state.services.model.engine = None  # as while the model is still loading
    try:
        assert_error(await wx.chat(greedy()), 2, contains="Service temporarily unavailable")
    finally:
        app.state.services.model.engine = engine


# ---------------------------------------------------------------------------- responses


async def test_response_shape_and_usage(wx: Wenxin, tokenizer: Tokenizer) -> None:
    resp = await wx.chat(greedy(max_output_tokens=7))
    assert resp.headers["content-type"] == "application/json;charset=utf-8"
    body = assert_ok(resp)
    assert set(body) == {"id", "object", "created", "result", "is_truncated", "need_clear_history",
                         "finish_reason", "usage"}  # fmt: skip
    assert re.fullmatch(r"as-[a-z0-9]{10}", body["id"])
    assert body["object"] == "chat.completion" and isinstance(body["created"], int)
    assert body["need_clear_history"] is False
    assert body["is_truncated"] is True and body["finish_reason"] == "length"
    prompt = sum(
        len(tokenizer.encode(p)) for p in ChatTemplate().segments([ChatMessage("user", HELLO[0]["content"])])
    )
    assert body["usage"] == {"prompt_tokens": prompt, "completion_tokens": 7, "total_tokens": prompt + 7}


async def test_greedy_result_equals_the_engine_output(wx: Wenxin) -> None:
    messages = [ChatMessage("user", HELLO[0]["content"])]
    expected = await engine_greedy(wx, messages, 24)
    assert expected
    for knobs in ({"top_k": 1}, {"top_p": 0}, {"top_k": 1, "temperature": 0.01}):
        body = assert_ok(await wx.chat({"messages": HELLO, "max_output_tokens": 24, **knobs}))
        assert body["result"] == expected, knobs


async def test_system_penalty_and_default_max_tokens_reach_the_engine(
    serve: ServeFactory, tokenizer: Tokenizer
) -> None:
    wx = await make_wenxin(await serve(default_max_tokens=9))
    system = "You answer in one word."
    messages = [ChatMessage("system", system), ChatMessage("user", HELLO[0]["content"])]
    body = assert_ok(await wx.chat({"messages": HELLO, "system": system, "top_k": 1}))
    assert body["usage"]["completion_tokens"] == 9  # the server's default_max_tokens
    assert body["usage"]["prompt_tokens"] == sum(
        len(tokenizer.encode(p)) for p in ChatTemplate().segments(messages)
    )
    assert body["result"] == await engine_greedy(wx, messages, 9)
    # penalty_score is the multiplicative repetition penalty on generated tokens.
    body = assert_ok(
        await wx.chat({"messages": HELLO, "top_k": 1, "penalty_score": 2.0, "max_output_tokens": 30})
    )
    expected = await engine_greedy(
        wx, [ChatMessage("user", HELLO[0]["content"])], 30, temperature=1.0, top_k=1, repetition_penalty=2.0
    )
    assert body["result"] == expected


async def test_client_stop_string(wx: Wenxin) -> None:
    full = assert_ok(await wx.chat(greedy(max_output_tokens=40)))["result"]
    words = [w for w in full.split() if len(w) >= 3]
    assert len(words) > 3, full
    stop = words[2][:3]
    expected = full[: full.index(stop)].strip()
    body = assert_ok(await wx.chat(greedy(max_output_tokens=40, stop=[stop])))
    assert body["result"] == expected
    assert body["finish_reason"] == "stop" and body["is_truncated"] is False
    events = stream_events(await wx.chat(greedy(max_output_tokens=40, stop=[stop], stream=True)))
    assert "".join(e["result"] for e in events) == expected
    assert events[-1]["finish_reason"] == "stop" and events[-1]["is_truncated"] is False


async def test_requests_are_logged_with_dialect_and_user(wx: Wenxin) -> None:
    assert_ok(await wx.chat(greedy(user_id="end-user-7", max_output_tokens=2)))
    await wx.served.app.state.services.request_log.flush()
    async with wx.served.app.state.services.storage.sessions() as session:
        rows = await RequestLogRepo(session).recent(10, dialect="wenxin")
    assert [(r.user, r.api_key_id, r.completion_tokens) for r in rows] == [
        ("end-user-7", str(wx.credential_id), 2)
    ]


# ---------------------------------------------------------------------------- streaming


async def test_stream_framing_sentences_and_running_usage(wx: Wenxin) -> None:
    whole = assert_ok(await wx.chat(greedy(max_output_tokens=60)))
    events = stream_events(await wx.chat(greedy(max_output_tokens=60, stream=True)))
    assert len(events) >= 2
    assert [e["sentence_id"] for e in events] == list(range(len(events)))
    assert [e["is_end"] for e in events] == [False] * (len(events) - 1) + [True]
    assert len({e["id"] for e in events}) == 1 and re.fullmatch(r"as-[a-z0-9]{10}", events[0]["id"])
    keys = ["id", "object", "created", "sentence_id", "is_end", "result", "is_truncated"]
    keys += ["need_clear_history", "finish_reason", "usage"]
    assert all(list(e) == keys for e in events)  # Baidu's key order too
    assert "".join(e["result"] for e in events) == whole["result"]
    for piece in (e["result"] for e in events[:-1]):
        assert piece
        ends = [m.end() for m in _SENTENCE_END.finditer(piece)]
        assert (ends and ends[-1] == len(piece)) or len(piece) == MAX_PIECE_CHARS, piece
    prompt = whole["usage"]["prompt_tokens"]
    assert all(e["usage"]["prompt_tokens"] == prompt for e in events)
    running = prompt
    for e in events:
        running += e["usage"]["completion_tokens"]
        assert e["usage"]["total_tokens"] == running
    assert running == prompt + 60 == whole["usage"]["total_tokens"]
    assert events[-1]["is_truncated"] is True and events[-1]["finish_reason"] == "length"
    assert all(e["is_truncated"] is False for e in events[:-1])


async def test_stream_pieces_split_on_sentence_ends(wx: Wenxin, monkeypatch: pytest.MonkeyPatch) -> None:
    # CJK: "ni hao", fullwidth "!" then "wo shi", "RWKV" and the CJK full stop.
    text = iter(["\u4f60\u597d", "\uff01\u6211\u662f", "RWKV\u3002", "Fine.", " Next", " line\n", "tail"])

    class Scripted:  # fault injection: a stream whose text is known
        prompt_token_count = 3

        def __init__(self) -> None:
            self.cancelled = False

        def __aiter__(self) -> Scripted:
            return self

        async def __anext__(self) -> Any:
            from rwkv_gateway.domain.types import Finish, FinishReason, TextDelta, Usage

            try:
                return TextDelta(next(text), (1,))
            except StopIteration:
                if self.cancelled:
                    raise StopAsyncIteration from None
                self.cancelled = True
                return Finish(FinishReason.STOP, Usage(3, 8), stop_matched=0)

        def cancel(self) -> None:
            self.cancelled = True

    async def submit(request: GenerationRequest) -> Scripted:
        return Scripted()

    monkeypatch.setattr(wx.served.app.state.services.model.engine, "submit", submit)
    events = stream_events(await wx.chat(greedy(stream=True)))
    assert [e["result"] for e in events] == [
        "\u4f60\u597d\uff01",
        "\u6211\u662fRWKV\u3002",
        "Fine.",
        " Next line\n",
        "tail",
    ]
    # A piece counts the tokens received since the previous one was sent ("Fine." waits for the next
    # character, "\n" is held as trailing space until text follows); the last adds what is left of 8.
    assert [e["usage"]["completion_tokens"] for e in events] == [2, 1, 2, 2, 1]
    assert events[-1]["usage"]["total_tokens"] == 11 and events[-1]["finish_reason"] == "normal"


async def test_a_stream_that_ends_without_finishing_says_so(
    wx: Wenxin, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Truncated:  # fault injection: an engine stream that stops without its Finish event
        prompt_token_count = 3

        def __init__(self) -> None:
            self.sent = False

        def __aiter__(self) -> Truncated:
            return self

        async def __anext__(self) -> Any:
            from rwkv_gateway.domain.types import TextDelta

            if self.sent:
                raise StopAsyncIteration
            self.sent = True
            return TextDelta("One.", (1,))

        def cancel(self) -> None:
            pass

    async def submit(request: GenerationRequest) -> Truncated:
        return Truncated()

    monkeypatch.setattr(wx.served.app.state.services.model.engine, "submit", submit)
    events = stream_events(await wx.chat(greedy(stream=True)))
    assert events[0]["result"] == "One." and events[0]["is_end"] is False
    assert events[1] == {
        "error_code": 336000,
        "error_msg": "Internal error: the generation ended without finishing",
    }


async def test_failure_after_the_first_byte_is_an_in_band_error_event(
    wx: Wenxin, monkeypatch: pytest.MonkeyPatch
) -> None:
    class FaultySampler(Sampler):  # fault injection: the 30th token of a marked request fails
        calls = 0

        def sample(self, logits):  # type: ignore[no-untyped-def]
            if self.params.repetition_penalty == FAULT_PENALTY:
                self.calls += 1
                if self.calls > 30:
                    raise RuntimeError("injected sampling fault")
            return super().sample(logits)

    monkeypatch.setattr(admission_mod, "Sampler", FaultySampler)
    body = greedy(max_output_tokens=100, penalty_score=FAULT_PENALTY)
    resp = await wx.chat({**body, "stream": True})
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    events = stream_events(resp)
    assert events[-1] == {"error_code": 336000, "error_msg": events[-1]["error_msg"]}
    assert "injected sampling fault" in events[-1]["error_msg"]
    assert all(e["is_end"] is False for e in events[:-1])
    assert_error(await wx.chat(body), 336000, contains="injected sampling fault")
    assert_ok(await wx.chat(greedy(max_output_tokens=2)))  # others are unaffected


async def test_a_stream_the_server_ends_at_shutdown_is_code_2_which_qianfan_retries(
    wx: Wenxin, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Until issue 16 this was 336000 (an internal error); the OpenAI and GLM dialects already answered
    # "not ready" (retry) for it, and the three now share one table (Finish.failure).
    from rwkv_gateway.domain.types import Finish, FinishReason, TextDelta, Usage

    class EndedAtShutdown:  # fault injection: the drain deadline passes after the first sentence
        prompt_token_count = 3
        events = (
            TextDelta("One.", (1,)),
            Finish(FinishReason.CANCELLED, Usage(3, 1), error="server shutting down"),
        )

        async def __aiter__(self) -> Any:
            for event in self.events:
                yield event

        async def collect(self) -> tuple[str, Finish]:
            return "One.", self.events[-1]  # type: ignore[return-value]

        def cancel(self) -> None:
            pass

    async def submit(request: GenerationRequest) -> EndedAtShutdown:
        return EndedAtShutdown()

    monkeypatch.setattr(wx.served.app.state.services.model.engine, "submit", submit)
    events = stream_events(await wx.chat(greedy(stream=True)))
    assert events[0]["result"] == "One." and events[0]["is_end"] is False
    assert events[1] == {
        "error_code": 2,
        "error_msg": "Service temporarily unavailable: server shutting down",
    }
    assert_error(await wx.chat(greedy()), 2, contains="server shutting down")


# ---------------------------------------------------------------------------- queue full


async def test_queue_full_is_336100(serve: ServeFactory, full_queue: FullQueue) -> None:
    wx = await make_wenxin(await serve(queue_size=1, max_batch_size=1))
    async with full_queue(wx.served.app.state.services.model.engine):
        for stream in (False, True):
            resp = await wx.chat(greedy(stream=stream))
            assert_error(resp, 336100, contains="try again later")
            assert int(resp.headers["retry-after"]) >= 1
    assert_ok(await wx.chat(greedy(max_output_tokens=2)))


# ---------------------------------------------------------------------------- multi-turn prefix reuse

QUESTIONS = ["What is RWKV?", "And what is a state?", "Say it again, shorter.", "Thanks!"]


async def conversation(wx: Wenxin) -> tuple[list[str], list[int]]:
    """Replies, and the prompt tokens the engine actually prefilled, turn by turn."""
    history: list[dict[str, str]] = []
    replies: list[str] = []
    prefilled: list[int] = []
    engine = wx.served.app.state.services.model.engine
    for question in QUESTIONS:
        history.append({"role": "user", "content": question})
        before = engine.stats()["prompt_tokens"]
        body = assert_ok(
            await wx.chat({"messages": history, "system": "Be brief.", "top_k": 1, "max_output_tokens": 10})
        )
        await idle(wx.served.app.state.services.model.engine)
        prefilled.append(engine.stats()["prompt_tokens"] - before)
        replies.append(body["result"])
        history.append({"role": "assistant", "content": body["result"]})
    return replies, prefilled


async def test_multi_turn_prefills_only_the_new_turn(serve: ServeFactory, tokenizer: Tokenizer) -> None:
    cached = await make_wenxin(await serve())
    uncached = await make_wenxin(await serve(prefix_cache=False))
    replies, prefilled = await conversation(cached)
    plain_replies, plain_prefilled = await conversation(uncached)
    assert replies == plain_replies
    template = ChatTemplate()
    for turn, question in enumerate(QUESTIONS):
        if turn == 0:
            assert prefilled[0] == plain_prefilled[0]
            continue
        new_turn = template.segments([ChatMessage("user", question)])
        assert prefilled[turn] == sum(len(tokenizer.encode(p)) for p in new_turn), (turn, prefilled)
        assert plain_prefilled[turn] > prefilled[turn]
    assert cached.served.app.state.services.model.engine.stats()["cached_tokens"] > 0
