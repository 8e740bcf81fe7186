"""The gateway's Prometheus metrics: one `GatewayMetrics` per app, in a registry of its own.

Three sources feed it. Finished generations (`record()`, chained into the engine's `on_finish` hook)
give the per-dialect figures: finish reasons, prompt and generated tokens, time to first token and
end-to-end latency. The engine itself is read at scrape time (`engine.stats()`, and the state store's
`stats()` when the engine has one): requests running and waiting, engine counters, state cache hits,
misses and bytes. The HTTP layer reports each response's route and status (`observe_http()`), and the
composition root the model load time. Never the process-global default registry: every app (tests
build many) owns its own, so figures never leak between apps.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from rwkv_gateway.domain.engine import Engine
from rwkv_gateway.domain.types import RequestRecord

logger = logging.getLogger(__name__)

PREFIX = "rwkv_gateway"

#: Seconds. TTFT spans a cached prefix on a GPU (milliseconds) to a long prompt queued on a CPU.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
#: Seconds. Whole generations run up to the request timeout (600 s by default).
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

# engine.stats() key -> (metric name, help). Counters only ever grow; absent keys are skipped, so an
# engine that reports fewer figures still scrapes.
_ENGINE_COUNTERS = {
    "requests": ("engine_requests", "Sequences admitted by the engine (one per choice or input)"),
    "rejected_busy": ("engine_busy_rejections", "Admissions refused because the queue was full"),
    "errors": ("engine_errors", "Sequences that ended with an engine error"),
    "steps": ("engine_steps", "Scheduler steps (one batched forward each)"),
    "prompt_tokens": ("engine_prefill_tokens", "Prompt tokens run through the model (cached ones excluded)"),
    "cached_tokens": (
        "prefix_cache_tokens",
        "Prompt tokens skipped: continued from a cached prefix state",
    ),
    "followup_tokens": ("engine_followup_tokens", "Reply tokens prefilled ahead for the next chat turn"),
    "generated_tokens": ("engine_generated_tokens", "Tokens sampled by the engine, all dialects"),
    "checkpoints": ("prefix_cache_checkpoints", "Prefix states stored in the state cache"),
    "followups_dropped": (
        "prefix_cache_followups_dropped",
        "Reply follow-up prefills given up so that a waiting request could run",
    ),
    "decode_rows": ("engine_decode_rows", "Rows fed one generated token (decode rows, summed over steps)"),
    "step_seconds": ("engine_step_seconds", "Time in model-thread steps (forward, sampling, bookkeeping)"),
    "forward_seconds": ("engine_forward_seconds", "Time in batched model forwards"),
    "sample_seconds": ("engine_sample_seconds", "Time sampling the next tokens of a step's rows"),
    "loop_seconds": (
        "engine_loop_seconds",
        "Time between steps while sequences were active (event loop: delivery, admission)",
    ),
}
_ENGINE_GAUGES = {
    "active_sequences": ("requests_running", "Sequences in the running batch (prefilling or decoding)"),
    "queue_depth": ("requests_waiting", "Sequences admitted, waiting for a batch slot (queue depth)"),
    "max_batch_size": ("batch_capacity", "Sequences the engine advances together at most"),
}
# state store stats() key -> (metric name, help, counter?)
_STATE_FIGURES = {
    "hits": ("state_cache_hits", "State snapshot lookups that found one (RAM or disk)", True),
    "misses": ("state_cache_misses", "State snapshot lookups that found none", True),
    "disk_reads": ("state_cache_disk_reads", "Snapshot hits served from a file", True),
    "disk_writes": ("state_cache_disk_writes", "Snapshots persisted to files", True),
    "evictions": ("state_cache_evictions", "Snapshots dropped from RAM to stay within the budget", True),
    "ram_bytes": ("state_cache_bytes", "Bytes of state snapshots held in RAM", False),
    "ram_entries": ("state_cache_entries", "State snapshots held in RAM", False),
}


class _EngineCollector:
    """Reads the engine's figures when Prometheus scrapes (nothing to keep in sync between scrapes)."""

    def __init__(self, engine: Callable[[], Engine | None], queue_size: int | None) -> None:
        self._engine = engine
        self._queue_size = queue_size

    def collect(self) -> Iterable[Metric]:
        engine = self._engine()
        loaded = GaugeMetricFamily(f"{PREFIX}_model_loaded", "1 once the model is loaded and serving")
        loaded.add_metric([], 0 if engine is None else 1)
        yield loaded
        if self._queue_size is not None:
            yield GaugeMetricFamily(
                f"{PREFIX}_queue_capacity", "Requests that may wait for a batch slot", value=self._queue_size
            )
        if engine is None:
            return
        try:
            stats = engine.stats()
        except Exception:  # a scrape must never fail because of one broken source
            logger.exception("engine stats failed")
            return
        yield from self._engine_figures(engine, stats)
        yield from self._state_figures(engine)

    def _engine_figures(self, engine: Engine, stats: dict[str, Any]) -> Iterable[Metric]:
        info = engine.info
        model = GaugeMetricFamily(
            f"{PREFIX}_model_info",
            "The model being served (always 1)",
            labels=["model", "model_id", "rwkv_version", "strategy", "demo"],
        )
        model.add_metric(
            [info.name, info.model_id, info.version, info.strategy, str(info.is_demo).lower()], 1
        )
        yield model
        gauges = {
            "active_sequences": (
                "requests_running",
                "Sequences in the running batch (prefilling or decoding)",
            ),
            "queue_depth": (
                "requests_waiting",
                "Sequences admitted and waiting for a batch slot (queue depth)",
            ),
            "max_batch_size": ("batch_capacity", "Sequences the engine advances together at most"),
        }
        for key, (name, doc) in gauges.items():
            if isinstance(value := stats.get(key), int | float):
                yield GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)
        for key, (name, doc) in _ENGINE_COUNTERS.items():
            if isinstance(value := stats.get(key), int | float):
                yield CounterMetricFamily(f"{PREFIX}_{name}", doc, value=value)

    def _state_figures(self, engine: Engine) -> Iterable[Metric]:
        store = engine.snapshots
        # Not part of the SnapshotStore protocol: read it when the store offers it.
        stats_of = getattr(store, "stats", None)
        if store is None or not callable(stats_of):
            return
        try:
            stats = stats_of()
        except Exception:
            logger.exception("state store stats failed")
            return
        for key, (name, doc, is_counter) in _STATE_FIGURES.items():
            value = stats.get(key)
            if not isinstance(value, int | float):
                continue
            family = CounterMetricFamily if is_counter else GaugeMetricFamily
            yield family(f"{PREFIX}_{name}", doc, value=value)
        budget = getattr(store, "budget_bytes", None)
        if isinstance(budget, int | float):
            yield GaugeMetricFamily(
                f"{PREFIX}_state_cache_budget_bytes", "RAM budget for state snapshots", value=budget
            )


class GatewayMetrics:
    """Every metric of one app. `record()` and `observe_http()` are safe from any thread."""

    def __init__(
        self,
        engine: Callable[[], Engine | None] = lambda: None,
        *,
        queue_size: int | None = None,
        process: bool = True,
    ) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        self.finished = Counter(
            f"{PREFIX}_requests_finished",
            "Generations finished, by dialect and finish reason (stop, length, cancelled, timeout, error)",
            ["dialect", "finish_reason"],
            registry=reg,
        )
        self.prompt_tokens = Counter(
            f"{PREFIX}_prompt_tokens", "Prompt tokens of finished generations", ["dialect"], registry=reg
        )
        self.generated_tokens = Counter(
            f"{PREFIX}_generated_tokens",
            "Tokens generated by finished generations",
            ["dialect"],
            registry=reg,
        )
        self.ttft = Histogram(
            f"{PREFIX}_time_to_first_token_seconds",
            "From admission to the first generated token",
            ["dialect"],
            buckets=TTFT_BUCKETS,
            registry=reg,
        )
        self.latency = Histogram(
            f"{PREFIX}_request_duration_seconds",
            "From admission to the end of the generation",
            ["dialect"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.model_load = Gauge(
            f"{PREFIX}_model_load_seconds", "How long loading the model took", registry=reg
        )
        self.http_requests = Counter(
            f"{PREFIX}_http_requests",
            "HTTP responses by route template, method and status",
            ["route", "method", "status"],
            registry=reg,
        )
        self.http_duration = Histogram(
            f"{PREFIX}_http_request_duration_seconds",
            "From the request to the end of its response (whole streams included)",
            ["route", "method"],
            buckets=HTTP_BUCKETS,
            registry=reg,
        )
        self.db_errors = Counter(
            f"{PREFIX}_db_errors",
            "Database operations that failed because the database was unreachable or too slow, by kind "
            "(connect, disconnect, timeout, pool_timeout, operational)",
            ["kind"],
            registry=reg,
        )
        reg.register(_EngineCollector(engine, queue_size))
        if process:
            ProcessCollector(registry=reg)

    def record(self, rec: RequestRecord) -> None:
        """Count one finished generation (the engine's on_finish hook)."""
        dialect = rec.dialect
        self.finished.labels(dialect, rec.finish_reason).inc()
        self.prompt_tokens.labels(dialect).inc(rec.prompt_tokens)
        self.generated_tokens.labels(dialect).inc(rec.completion_tokens)
        if rec.ttft_ms is not None:
            self.ttft.labels(dialect).observe(rec.ttft_ms / 1000)
        self.latency.labels(dialect).observe(rec.total_ms / 1000)

    def db_error(self, kind: str) -> None:
        """Count one database outage error (the storage's error hook)."""
        self.db_errors.labels(kind).inc()

    def model_loaded(self, seconds: float) -> None:
        self.model_load.set(seconds)

    def observe_http(self, route: str, method: str, status: int, seconds: float) -> None:
        self.http_requests.labels(route, method, str(status)).inc()
        self.http_duration.labels(route, method).observe(seconds)

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition (Prometheus text, or OpenMetrics when `accept` asks for it) and its media type."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type


def chain(*hooks: Callable[[RequestRecord], None]) -> Callable[[RequestRecord], None]:
    """One on_finish hook calling each of `hooks`; one failing does not keep the others from running."""

    def each(rec: RequestRecord) -> None:
        for hook in hooks:
            try:
                hook(rec)
            except Exception:
                logger.exception("on_finish hook %r failed", hook)

    return each
