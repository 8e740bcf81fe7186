"""`GET /metrics` after real requests through the OpenAI dialect: per-dialect token counters match the
responses' usage exactly, histograms count every generation, finish reasons and HTTP statuses are
labelled, engine and state-cache figures are the engine's own, and every app has its own registry."""

from __future__ import annotations

import json
from collections import Counter
from typing import TYPE_CHECKING, Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from rwkv_gateway.domain.types import RequestRecord
from rwkv_gateway.services.metrics import GatewayMetrics, chain
from support import idle

if TYPE_CHECKING:
    from conftest import Served, ServeFactory

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(client: httpx.AsyncClient) -> Samples:
    resp = await client.get("/metrics")
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    samples: Samples = {}
    for family in text_string_to_metric_families(resp.text):
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in samples, f"duplicate series {key}"
            samples[key] = s.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def stream_usage(resp: httpx.Response) -> tuple[dict[str, Any], str]:
    """The usage chunk and the finish reason of an OpenAI stream (include_usage on)."""
    assert resp.status_code == 200, resp.text
    chunks = [
        json.loads(line[len("data: ") :])
        for line in resp.text.split("\n")
        if line.startswith("data: ") and line != "data: [DONE]"
    ]
    reasons = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    finish = [r for r in reasons if r is not None]
    assert len(finish) == 1
    usage = chunks[-1]["usage"]
    assert usage is not None
    return usage, finish[0]


async def test_counters_and_histograms_follow_openai_requests(served: Served) -> None:
    client = served.client
    before = await scrape(client)
    assert value(before, "rwkv_gateway_prompt_tokens_total", dialect="openai") == 0
    assert value(before, "rwkv_gateway_model_loaded") == 1

    results: list[tuple[dict[str, Any], str]] = []
    resp = await client.post(
        CHAT,
        json={"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 6, "temperature": 0},
    )
    assert resp.status_code == 200, resp.text
    results.append((resp.json()["usage"], resp.json()["choices"][0]["finish_reason"]))

    resp = await client.post(
        CHAT,
        json={
            "messages": [{"role": "user", "content": "Tell me a story"}],
            "max_tokens": 4,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    results.append(stream_usage(resp))

    # Greedy text, then the same prompt asked to stop at a piece of that text: a "stop" finish.
    body = {"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}
    first = (await client.post(COMPLETIONS, json=body)).json()
    results.append((first["usage"], first["choices"][0]["finish_reason"]))
    text = first["choices"][0]["text"]
    assert len(text) >= 2
    stopped = (await client.post(COMPLETIONS, json={**body, "stop": [text[1:3]]})).json()
    assert stopped["choices"][0]["finish_reason"] == "stop"
    results.append((stopped["usage"], "stop"))

    await idle(served.app.state.services.model.engine)
    after = await scrape(client)
    prompt = sum(u["prompt_tokens"] for u, _ in results)
    generated = sum(u["completion_tokens"] for u, _ in results)
    assert value(after, "rwkv_gateway_prompt_tokens_total", dialect="openai") == prompt
    assert value(after, "rwkv_gateway_generated_tokens_total", dialect="openai") == generated
    reasons = Counter(reason for _, reason in results)
    assert reasons["length"] == 3 and reasons["stop"] == 1
    for reason, count in reasons.items():
        assert (
            value(after, "rwkv_gateway_requests_finished_total", dialect="openai", finish_reason=reason)
            == count
        )
    n = len(results)
    assert value(after, "rwkv_gateway_request_duration_seconds_count", dialect="openai") == n
    assert value(after, "rwkv_gateway_time_to_first_token_seconds_count", dialect="openai") == n
    assert value(after, "rwkv_gateway_time_to_first_token_seconds_bucket", dialect="openai", le="+Inf") == n
    assert value(after, "rwkv_gateway_request_duration_seconds_sum", dialect="openai") > 0
    # Every generated token is the engine's, and nothing else ran on it.
    assert value(after, "rwkv_gateway_engine_generated_tokens_total") == generated
    assert value(after, "rwkv_gateway_engine_requests_total") == n


async def test_http_responses_by_route_template_and_status(served: Served) -> None:
    client = served.client
    for _ in range(2):
        assert (await client.get("/healthz")).status_code == 200
    bad = await client.post(CHAT, json={"messages": "not a list"})
    assert bad.status_code == 400
    assert (await client.get("/no/such/path/123")).status_code == 404
    assert (await client.get("/no/such/path/456")).status_code == 404
    samples = await scrape(client)
    http = "rwkv_gateway_http_requests_total"
    assert value(samples, http, route="/healthz", method="GET", status="200") == 2
    assert value(samples, http, route=CHAT, method="POST", status="400") == 1
    # Unknown paths share one series, whatever the URL.
    assert value(samples, http, route="unmatched", method="GET", status="404") == 2
    assert not any("/no/such" in str(labels) for _, labels in samples)
    assert (
        value(samples, "rwkv_gateway_http_request_duration_seconds_count", route="/healthz", method="GET")
        == 2
    )


async def test_engine_and_state_cache_figures_are_the_engines(served: Served) -> None:
    client = served.client
    chat = {
        "messages": [{"role": "user", "content": "Same question twice"}],
        "max_tokens": 3,
        "temperature": 0,
    }
    for _ in range(2):
        assert (await client.post(CHAT, json=chat)).status_code == 200
    engine = served.app.state.services.model.engine
    await idle(engine)
    samples = await scrape(client)
    stats = engine.stats()
    store = engine.snapshots.stats()
    assert value(samples, "rwkv_gateway_requests_running") == stats["active_sequences"] == 0
    assert value(samples, "rwkv_gateway_requests_waiting") == stats["queue_depth"] == 0
    assert value(samples, "rwkv_gateway_queue_capacity") == served.settings.queue_size
    assert value(samples, "rwkv_gateway_batch_capacity") == served.settings.max_batch_size
    assert value(samples, "rwkv_gateway_prefix_cache_tokens_total") == stats["cached_tokens"] > 0
    assert value(samples, "rwkv_gateway_engine_prefill_tokens_total") == stats["prompt_tokens"]
    # The second request continued from the first one's cached states.
    assert store["hits"] >= 1
    assert value(samples, "rwkv_gateway_state_cache_hits_total") == store["hits"]
    assert value(samples, "rwkv_gateway_state_cache_misses_total") == store["misses"]
    assert value(samples, "rwkv_gateway_state_cache_bytes") == store["ram_bytes"] > 0
    assert value(samples, "rwkv_gateway_state_cache_entries") == store["ram_entries"]
    assert value(samples, "rwkv_gateway_state_cache_budget_bytes") == served.settings.state_cache_mb * 2**20
    info = engine.info
    model = {
        "model": info.name,
        "model_id": info.model_id,
        "rwkv_version": "7",
        "strategy": "cpu fp32",
        "demo": "false",
    }
    assert value(samples, "rwkv_gateway_model_info", **model) == 1
    assert value(samples, "rwkv_gateway_model_load_seconds") > 0


async def test_openmetrics_on_request(served: Served) -> None:
    resp = await served.client.get("/metrics", headers={"Accept": "application/openmetrics-text"})
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("application/openmetrics-text")
    assert resp.text.endswith("# EOF\n")


async def test_every_app_has_its_own_registry(serve: ServeFactory) -> None:
    one = await serve()
    two = await serve()
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    usage = (await one.client.post(CHAT, json=chat)).json()["usage"]
    first, second = await scrape(one.client), await scrape(two.client)
    assert value(first, "rwkv_gateway_generated_tokens_total", dialect="openai") == usage["completion_tokens"]
    assert value(second, "rwkv_gateway_generated_tokens_total", dialect="openai") == 0
    assert value(second, "rwkv_gateway_http_requests_total", route=CHAT, method="POST", status="200") == 0


def record(**overrides: Any) -> RequestRecord:
    fields: dict[str, Any] = {
        "request_id": "r1",
        "dialect": "glm",
        "user": None,
        "api_key_id": None,
        "prompt_tokens": 10,
        "completion_tokens": 4,
        "ttft_ms": 250.0,
        "total_ms": 1500.0,
        "finish_reason": "stop",
    }
    return RequestRecord(**{**fields, **overrides})


def test_record_without_first_token_counts_no_ttft() -> None:
    metrics = GatewayMetrics(process=False)
    metrics.record(record())
    metrics.record(record(completion_tokens=0, ttft_ms=None, total_ms=40.0, finish_reason="cancelled"))
    reg = metrics.registry
    assert reg.get_sample_value("rwkv_gateway_prompt_tokens_total", {"dialect": "glm"}) == 20
    assert reg.get_sample_value("rwkv_gateway_generated_tokens_total", {"dialect": "glm"}) == 4
    assert reg.get_sample_value("rwkv_gateway_time_to_first_token_seconds_count", {"dialect": "glm"}) == 1
    assert reg.get_sample_value("rwkv_gateway_time_to_first_token_seconds_sum", {"dialect": "glm"}) == 0.25
    ttft_le_half = {"dialect": "glm", "le": "0.5"}
    assert reg.get_sample_value("rwkv_gateway_time_to_first_token_seconds_bucket", ttft_le_half) == 1
    assert reg.get_sample_value("rwkv_gateway_request_duration_seconds_count", {"dialect": "glm"}) == 2
    assert reg.get_sample_value("rwkv_gateway_request_duration_seconds_sum", {"dialect": "glm"}) == 1.54
    cancelled = {"dialect": "glm", "finish_reason": "cancelled"}
    assert reg.get_sample_value("rwkv_gateway_requests_finished_total", cancelled) == 1
    # No engine yet: the model is reported as not loaded, and nothing else of the engine.
    assert reg.get_sample_value("rwkv_gateway_model_loaded") == 0
    assert reg.get_sample_value("rwkv_gateway_requests_running") is None


def test_chained_hooks_all_run_when_one_fails() -> None:
    seen: list[str] = []

    def broken(rec: RequestRecord) -> None:
        raise RuntimeError("database gone")

    hook = chain(broken, lambda rec: seen.append(rec.request_id))
    hook(record(request_id="abc"))
    assert seen == ["abc"]
