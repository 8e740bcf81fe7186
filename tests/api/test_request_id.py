"""Request ids and logs: `X-Request-Id` is taken (when sane) or made, echoed on every response (JSON,
event streams, errors, unexpected failures), and named by every log line written while serving the
request; the JSON log format writes one valid object per line; prompt text never reaches the logs."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from fastapi.responses import StreamingResponse

from rwkv_gateway.api.common.request_id import accepted_request_id
from rwkv_gateway.logs import GatewayHandler, configure_logging, make_handler, request_id_var
from support import free_port

if TYPE_CHECKING:
    from conftest import Served

CHAT = "/v1/chat/completions"
HEX32 = re.compile(r"[0-9a-f]{32}")
test_logger = logging.getLogger("tests.request_id")


@contextlib.contextmanager
def captured(fmt: str = "json", level: int = logging.DEBUG) -> Iterator[io.StringIO]:
    """Everything logged anywhere while the block runs, formatted as the server would write it."""
    out = io.StringIO()
    handler = make_handler(fmt, out)  # type: ignore[arg-type]
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(level)
    try:
        yield out
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


def json_lines(out: io.StringIO) -> list[dict[str, Any]]:
    lines = out.getvalue().splitlines()
    assert lines, "nothing was logged"
    return [json.loads(line) for line in lines]


async def test_given_id_is_echoed_on_json_responses(served: Served) -> None:
    resp = await served.client.get("/healthz", headers={"X-Request-Id": "client-42"})
    assert resp.headers["x-request-id"] == "client-42"
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    resp = await served.client.post(
        CHAT, json=chat, headers={"X-Request-Id": "sdk-py-0.4.12.3-AbCdEf0123456789"}
    )
    assert resp.status_code == 200
    assert resp.headers["x-request-id"] == "sdk-py-0.4.12.3-AbCdEf0123456789"


async def test_missing_id_is_made_fresh_for_each_request(served: Served) -> None:
    ids = [(await served.client.get("/healthz")).headers["x-request-id"] for _ in range(3)]
    assert all(HEX32.fullmatch(i) for i in ids), ids
    assert len(set(ids)) == 3


async def test_given_id_is_echoed_on_event_streams(served: Served) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}
    resp = await served.client.post(CHAT, json=body, headers={"X-Request-Id": "stream-1"})
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    assert resp.headers["x-request-id"] == "stream-1"
    assert resp.text.endswith("data: [DONE]\n\n")
    resp = await served.client.post(CHAT, json=body)
    assert HEX32.fullmatch(resp.headers["x-request-id"])


async def test_error_responses_carry_the_id(served: Served) -> None:
    bad = await served.client.post(CHAT, json={"messages": 3}, headers={"X-Request-Id": "bad-1"})
    assert bad.status_code == 400 and bad.headers["x-request-id"] == "bad-1"
    missing = await served.client.get("/nowhere", headers={"X-Request-Id": "nf-1"})
    assert missing.status_code == 404 and missing.headers["x-request-id"] == "nf-1"
    too_big = await served.client.post(
        CHAT, content=b"x" * (served.settings.max_body_bytes + 1), headers={"X-Request-Id": "big-1"}
    )
    assert too_big.status_code == 413 and too_big.headers["x-request-id"] == "big-1"


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        ("a" * 128, True),
        ("  padded-id  ", True),
        ("a" * 129, False),
        ("", False),
        ("line\nbreak", False),
        ("tab\there", False),
        ("caf\u00e9", False),
    ],
)
def test_which_ids_are_accepted(given: str, kept: bool) -> None:
    assert accepted_request_id(given) == (given.strip() if kept else None)


async def test_unacceptable_ids_are_replaced(served: Served) -> None:
    for raw in (b"a" * 129, b"caf\xc3\xa9", b"x\x01y"):
        resp = await served.client.get("/healthz", headers={"X-Request-Id": raw})
        assert HEX32.fullmatch(resp.headers["x-request-id"]), raw


async def test_unexpected_failure_is_logged_with_the_id_and_answered_with_it(served: Served) -> None:
    async def boom() -> None:
        raise RuntimeError("kaboom")

    served.app.add_api_route("/test-only/boom", boom)
    with captured() as out:
        resp = await served.client.get("/test-only/boom", headers={"X-Request-Id": "boom-7"})
    assert resp.status_code == 500
    assert resp.headers["x-request-id"] == "boom-7"
    assert resp.json() == {"error": {"code": "internal_error", "message": "internal server error"}}
    records = [r for r in json_lines(out) if r["logger"] == "rwkv_gateway.app"]
    assert len(records) == 1
    (record,) = records
    assert record["request_id"] == "boom-7"
    assert record["level"] == "error"
    assert record["message"] == "unhandled error on GET /test-only/boom"
    assert "RuntimeError: kaboom" in record["exc_info"]
    # The failure is counted under its route, with the status the client got.
    metrics = served.app.state.services.metrics.registry
    labels = {"route": "/test-only/boom", "method": "GET", "status": "500"}
    assert metrics.get_sample_value("rwkv_gateway_http_requests_total", labels) == 1


async def test_log_lines_inside_a_stream_body_name_the_request(served: Served) -> None:
    async def events() -> AsyncIterator[bytes]:
        for i in range(3):
            test_logger.info("sending part %s", i)
            yield f"part {i}\n".encode()

    async def streaming() -> StreamingResponse:
        test_logger.info("starting")
        return StreamingResponse(events(), media_type="text/plain")

    served.app.add_api_route("/test-only/stream", streaming)
    with captured() as out:
        resp = await served.client.get("/test-only/stream", headers={"X-Request-Id": "s-9"})
        other = await served.client.get("/test-only/stream")
    assert resp.text == "part 0\npart 1\npart 2\n"
    assert resp.headers["x-request-id"] == "s-9"
    mine = [r for r in json_lines(out) if r["logger"] == "tests.request_id"]
    assert [r["message"] for r in mine] == [
        "starting",
        "sending part 0",
        "sending part 1",
        "sending part 2",
    ] * 2
    assert [r["request_id"] for r in mine] == ["s-9"] * 4 + [other.headers["x-request-id"]] * 4
    # Outside a request nothing is set.
    assert request_id_var.get() is None


def test_json_lines_have_the_documented_fields() -> None:
    out = io.StringIO()
    handler = make_handler("json", out)
    log = logging.getLogger("tests.json_format")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    token = request_id_var.set("req-1")
    try:
        log.info("hello %s", "world", extra={"dialect": "glm", "tokens": 3})
        log.warning('quote " and newline\n inside', extra={"color_message": "\x1b[36mcoloured\x1b[0m"})
    finally:
        request_id_var.reset(token)
        log.info("after")
        log.removeHandler(handler)
        log.propagate = True
    first, second, third = json_lines(out)
    assert set(first) == {"ts", "level", "logger", "message", "request_id", "dialect", "tokens"}
    assert first["message"] == "hello world" and first["level"] == "info"
    assert first["logger"] == "tests.json_format" and first["request_id"] == "req-1"
    assert (first["dialect"], first["tokens"]) == ("glm", 3)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", first["ts"])
    assert second["message"] == 'quote " and newline\n inside' and second["level"] == "warning"
    assert "color_message" not in second  # uvicorn's ANSI-coloured duplicate of the message
    assert third["request_id"] is None


def test_text_lines_name_the_request() -> None:
    out = io.StringIO()
    handler = make_handler("text", out)
    log = logging.getLogger("tests.text_format")
    log.addHandler(handler)
    log.propagate = False
    token = request_id_var.set("req-2")
    try:
        log.warning("inside")
    finally:
        request_id_var.reset(token)
    log.warning("outside")
    log.removeHandler(handler)
    log.propagate = True
    inside, outside = out.getvalue().splitlines()
    assert inside.endswith(" WARNING tests.text_format [req-2]: inside")
    assert outside.endswith(" WARNING tests.text_format [-]: outside")


def test_configure_logging_installs_one_handler_and_masks_access_tokens() -> None:
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    access = logging.getLogger("uvicorn.access")
    saved_access = (list(access.handlers), list(access.filters), access.propagate, access.level)
    out = io.StringIO()
    try:
        access.setLevel(logging.WARNING)  # what an earlier uvicorn.Config(log_level="warning") leaves
        configure_logging("info", "text")
        configure_logging("info", "json", stream=out)
        assert sum(isinstance(h, GatewayHandler) for h in root.handlers) == 1
        assert root.level == logging.INFO
        # uvicorn's access line: client, method, path with query, http version, status.
        access.info(
            '%s - "%s %s HTTP/%s" %d',
            "127.0.0.1:5000",
            "POST",
            "/rpc/2.0/ai_custom/v1/wenxinworkshop/chat/rwkv?access_token=24.secret.value&x=1",
            "1.1",
            200,
        )
        (line,) = json_lines(out)
        assert "secret" not in line["message"]
        assert line["message"].endswith('/chat/rwkv?access_token=***&x=1 HTTP/1.1" 200')
        assert line["logger"] == "uvicorn.access"
    finally:
        for handler in list(root.handlers):
            if handler not in saved_handlers:
                root.removeHandler(handler)
        root.setLevel(saved_level)
        access.handlers[:], access.filters[:] = saved_access[0], saved_access[1]
        access.propagate = saved_access[2]
        access.setLevel(saved_access[3])


async def test_prompt_text_stays_out_of_the_logs(served: Served) -> None:
    assert served.settings.log_prompts is False
    secret = "zebra-quartz-7781-unique-prompt"
    client = served.client
    with captured("text") as text_out, captured("json") as json_out:
        chat = {"messages": [{"role": "user", "content": f"My secret is {secret}"}], "max_tokens": 3}
        assert (await client.post(CHAT, json=chat)).status_code == 200
        assert (await client.post(CHAT, json={**chat, "stream": True})).status_code == 200
        assert (
            await client.post("/v1/completions", json={"prompt": secret, "max_tokens": 2})
        ).status_code == 200
        assert (await client.post("/v1/embeddings", json={"input": secret})).status_code == 200
        # Failures too: a bad value next to the prompt, and an oversized body made of it.
        bad = {**chat, "temperature": "hot"}
        assert (await client.post(CHAT, json=bad)).status_code == 400
        huge = json.dumps({"prompt": secret * (served.settings.max_body_bytes // len(secret))})
        assert (await client.post("/v1/completions", content=huge)).status_code == 413
        test_logger.debug("control line")  # proves the capture works at DEBUG
    for out in (text_out, json_out):
        logged = out.getvalue()
        assert "control line" in logged
        assert secret not in logged


def test_live_server_writes_json_lines_with_request_ids(v7_path: Path, tmp_path: Path) -> None:
    """`rwkv-gateway serve --log-format json`: every line on stderr is a JSON object, uvicorn's access
    line names the request's id, and the prompt is nowhere in the log."""
    port = free_port()
    cli = [sys.executable, "-m", "rwkv_gateway"]
    cmd = [*cli, "serve", "--model", str(v7_path), "--data-dir", str(tmp_path / "data"), "--port", str(port)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RWKV_GATEWAY_")}
    proc = subprocess.Popen(
        [*cmd, "--log-format", "json"], env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
    )
    secret = "walrus-tangerine-5521"
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            assert proc.poll() is None, "the server exited"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            time.sleep(0.1)
        chat = {"messages": [{"role": "user", "content": secret}], "max_tokens": 2, "stream": True}
        resp = httpx.post(f"{base}{CHAT}", json=chat, headers={"X-Request-Id": "live-req-1"}, timeout=60)
        assert resp.status_code == 200 and resp.headers["x-request-id"] == "live-req-1"
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    lines = [json.loads(line) for line in err.splitlines()]
    assert all({"ts", "level", "logger", "message", "request_id"} <= set(line) for line in lines)
    access = [line for line in lines if line["logger"] == "uvicorn.access" and CHAT in line["message"]]
    assert len(access) == 1 and access[0]["request_id"] == "live-req-1"
    assert any(line["message"].startswith("model ") and " loaded in " in line["message"] for line in lines)
    assert secret not in err
