"""Prometheus metrics, in a registry of the application's own.

Not prometheus_client's global registry: two applications in one process (tests, or a
library user) would otherwise share, or refuse to register, the same series. Every
series has a ``model`` label (empty where no model was resolved, as a 413 before the body
is read). Gauges that describe the pool (state, running, queued, memory) are set on each
scrape by the hooks the pool registers (``on_scrape``), so they are never stale.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

logger = logging.getLogger(__name__)

CONTENT_TYPE = CONTENT_TYPE_LATEST
# Seconds, from a token on a warm GPU to a request waiting behind a long queue.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# Model loads: seconds (a warm wake) to many minutes (a large download and compile).
LOAD_BUCKETS = (1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
MODEL_STATES = ("not_loaded", "loading", "ready", "sleeping", "failed")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "v4serve_requests",
            "Generation requests by outcome (HTTP status; 499: the client left)",
            ["model", "route", "status"],
            registry=r,
        )
        self.batch_lines = Counter(
            "v4serve_batch_lines",
            "Batch job lines by outcome, also counted in v4serve_requests_total (status as the line's route answers)",
            ["model", "route", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter("v4serve_prompt_tokens", "Prompt tokens of requests", ["model"], registry=r)
        self.generation_tokens = Counter(
            "v4serve_generation_tokens", "Tokens generated (aborted requests' included)", ["model"], registry=r
        )
        self.time_to_first_token = Histogram(
            "v4serve_time_to_first_token_seconds",
            "From the request's arrival to its first token (streamed requests)",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            "v4serve_inter_token_latency_seconds",
            "Between two tokens of one choice (streamed requests)",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.request_duration = Histogram(
            "v4serve_request_duration_seconds",
            "From the request's arrival to its last byte",
            ["model", "route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "v4serve_queue_wait_seconds",
            "Time waiting for a running slot of the model (admission queue)",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.running_requests = Gauge(
            "v4serve_running_requests", "Requests admitted to the engine", ["model"], registry=r
        )
        self.queued_requests = Gauge(
            "v4serve_queued_requests", "Requests waiting for a running slot", ["model"], registry=r
        )
        self.model_state = Gauge(
            "v4serve_model_state", "1 for the state the model is in", ["model", "state"], registry=r
        )
        self.memory_reserved = Gauge(
            "v4serve_memory_reserved_bytes",
            "Device memory the pool has reserved for a model's engine",
            ["device", "model"],
            registry=r,
        )
        self.model_loads = Counter(
            "v4serve_model_loads", "Engine starts and wakes that succeeded", ["model"], registry=r
        )
        self.model_evictions = Counter(
            "v4serve_model_evictions",
            "Engines unloaded or put to sleep to make room or after keep-alive",
            ["model"],
            registry=r,
        )
        self.engine_restarts = Counter(
            "v4serve_engine_restarts", "Loads of a model whose previous engine failed or died", ["model"], registry=r
        )
        self.rejections = Counter(
            "v4serve_rejections",
            "Requests refused by status: 413 too large, 429 over limits, 503 unavailable",
            ["model", "reason"],
            registry=r,
        )
        self.model_load_seconds = Histogram(
            "v4serve_model_load_seconds", "Engine start time", ["model"], buckets=LOAD_BUCKETS, registry=r
        )
        self.model_wake_seconds = Histogram(
            "v4serve_model_wake_seconds", "Time to wake a sleeping engine", ["model"], buckets=LOAD_BUCKETS, registry=r
        )
        # The engines' own scheduler statistics, per engine: vLLM's through its stat logger
        # hook, the transformers engine's from its batch thread (no KV-cache figure there).
        self.kv_cache_usage = Gauge(
            "v4serve_engine_kv_cache_usage_ratio", "Share of the engine's KV cache in use (vLLM)", ["model"], registry=r
        )
        self.engine_waiting = Gauge(
            "v4serve_engine_waiting_requests",
            "Requests waiting in the engine's scheduler",
            ["model"],
            registry=r,
        )
        self.preemptions = Counter(
            "v4serve_engine_preemptions", "Requests preempted by the engine's scheduler (vLLM)", ["model"], registry=r
        )
        self.batch_size = Histogram(
            "v4serve_engine_batch_size",
            "Requests running in one engine step",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self._scrape_hooks: list[Callable[[], None]] = []

    def on_scrape(self, hook: Callable[[], None]) -> None:
        """Call ``hook`` before each scrape, to set gauges from live state."""
        self._scrape_hooks.append(hook)

    def render(self) -> bytes:
        """The text exposition format, gauges refreshed first."""
        for hook in self._scrape_hooks:
            try:
                hook()
            except Exception:
                logger.exception("a metrics scrape hook failed; its gauges may be stale")
        return generate_latest(self.registry)

    # ----- what the pool reports ---------------------------------------------------------

    def set_models(self, models: Iterable[tuple[str, str, int, int]]) -> None:
        """Every (model, state, running, queued) now: a model no longer registered drops out."""
        for gauge in (self.model_state, self.running_requests, self.queued_requests):
            gauge.clear()
        for model, state, running, queued in models:
            for name in MODEL_STATES:
                self.model_state.labels(model=model, state=name).set(1 if name == state else 0)
            self.running_requests.labels(model=model).set(running)
            self.queued_requests.labels(model=model).set(queued)

    def set_memory(self, reserved: Iterable[tuple[str, str, int]]) -> None:
        """Every (device, model, bytes) reservation now; others are dropped. Reservations
        with the same device and model add up (an engine draining beside its successor)."""
        self.memory_reserved.clear()
        for device, model, size in reserved:
            self.memory_reserved.labels(device=device, model=model).inc(size)

    def loaded(self, model: str, seconds: float, *, woken: bool, restart: bool) -> None:
        """An engine of ``model`` became ready after ``seconds``: started, or ``woken`` from
        sleep; a ``restart`` when the model had failed before."""
        self.model_loads.labels(model=model).inc()
        (self.model_wake_seconds if woken else self.model_load_seconds).labels(model=model).observe(seconds)
        if restart:
            self.engine_restarts.labels(model=model).inc()

    def engine(self, model: str) -> EngineMetrics:
        return EngineMetrics(self, model)


class EngineMetrics:
    """What one engine's stat logger writes, with the engine's model as label."""

    def __init__(self, metrics: Metrics, model: str):
        self._metrics, self._model = metrics, model
        self._waiting = metrics.engine_waiting.labels(model=model)
        self._batch = metrics.batch_size.labels(model=model)
        # Exported from an engine's first figure on: an engine that has none (the
        # transformers engine has no KV cache to measure) shows no series, not a zero.
        self._kv_cache: Gauge | None = None
        self._preemptions: Counter | None = None

    def scheduler_step(self, *, running: int, waiting: int, kv_cache_usage: float | None = None) -> None:
        """One engine step: ``running`` requests in it, ``waiting`` queued for the next ones.
        Called from the engine's thread (prometheus_client's values are thread-safe)."""
        if kv_cache_usage is not None:
            if self._kv_cache is None:
                self._kv_cache = self._metrics.kv_cache_usage.labels(model=self._model)
            self._kv_cache.set(kv_cache_usage)
        self._waiting.set(waiting)
        if running:
            self._batch.observe(running)

    def preempted(self, count: int) -> None:
        """An engine step preempted ``count`` requests (vLLM reports it every step, zeros too)."""
        if self._preemptions is None:
            self._preemptions = self._metrics.preemptions.labels(model=self._model)
        if count:
            self._preemptions.inc(count)
