"""``GET /metrics``: exact counter values after known requests, in process.

The real application with stand-in engines (tests/in_process.py): every middleware,
route, the service and the pool run as in production, so what the metrics count is what
the server did. The stand-in answers ``max_tokens`` tokens and counts one prompt token a
word plus one, so every token count below is known in advance. The slow layer checks the
same against the real server and vLLM (tests/test_metrics_real_server.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.api import create_app, state_of
from server.registry import Registry
from server.settings import Settings
from server.telemetry import Metrics
from tests.conftest import API_KEY, OTHER_KEY
from tests.in_process import InProcessServer, cached_registry, serve_in_process

# One model admitting one request at a time and queueing none: the second concurrent
# request is refused with 429.
LIMITED = """\
models:
  limited:
    source: builtin:tiny-llama
    max_running: 1
    max_queued: 0
"""


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a Prometheus text exposition, by name and labels."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(text: str, name: str, **labels: str) -> float:
    """The sample ``name{labels}``; 0 when the server has not exported it (a counter never incremented)."""
    return samples(text).get((name, frozenset(labels.items())), 0.0)


async def scrape(server: InProcessServer, api_key: str | None = API_KEY) -> str:
    async with server.client(api_key=api_key) as http:
        response = await http.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return response.text


@pytest.fixture(scope="module")
def limited_registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    overlay = tmp_path_factory.mktemp("metrics") / "limited.yaml"
    overlay.write_text(LIMITED)
    return cached_registry(overlay)


@pytest.fixture
async def server(tmp_path: Path, limited_registry: Registry) -> AsyncIterator[InProcessServer]:
    async with serve_in_process(tmp_path, registry=limited_registry, max_body_bytes=4096) as running:
        yield running


def v4(max_tokens: int, *, stream: bool = False, model: str = "tiny-llama", prompt: str = "one two three") -> dict:
    return {"model": model, "prompt": prompt, "stream": stream, "model_parameters": {"max_tokens": max_tokens}}


async def test_known_requests_give_exact_counters(server: InProcessServer) -> None:
    async with server.client() as http:
        for _ in range(3):
            assert (await http.post("/v4/completions", json=v4(5))).status_code == 200
        for _ in range(2):
            assert (await http.post("/v4/completions", json=v4(4, stream=True))).status_code == 200
        body = {"model": "tiny-llama", "prompt": "one two", "max_tokens": 3}
        assert (await http.post("/v1/completions", json=body)).status_code == 200
        # Refused before any model is involved: counted as rejections or not at all.
        assert (await http.post("/v4/completions", json=v4(5, model="no-such-model"))).status_code == 404
        assert (await http.post("/v4/completions", content=b"x" * 5000)).status_code == 413
    text = await scrape(server)
    model = {"model": "tiny-llama"}
    assert value(text, "v4serve_requests_total", route="/v4/completions", status="200", **model) == 5
    assert value(text, "v4serve_requests_total", route="/v1/completions", status="200", **model) == 1
    # Prompts: "one two three" is 3 words + BOS = 4 tokens, "one two" 3.
    assert value(text, "v4serve_prompt_tokens_total", **model) == 5 * 4 + 3
    assert value(text, "v4serve_generation_tokens_total", **model) == 3 * 5 + 2 * 4 + 3
    assert value(text, "v4serve_request_duration_seconds_count", route="/v4/completions", **model) == 5
    assert value(text, "v4serve_queue_wait_seconds_count", **model) == 6
    # Time to first token and between tokens are measured on streamed requests only: 2
    # streams of 4 tokens have 2 first tokens and 2 x 3 gaps.
    assert value(text, "v4serve_time_to_first_token_seconds_count", **model) == 2
    assert value(text, "v4serve_inter_token_latency_seconds_count", **model) == 6
    assert value(text, "v4serve_rejections_total", model="", reason="413") == 1
    assert value(text, "v4serve_model_loads_total", **model) == 1
    assert value(text, "v4serve_model_load_seconds_count", **model) == 1
    assert value(text, "v4serve_model_state", state="ready", **model) == 1
    assert value(text, "v4serve_model_state", state="not_loaded", **model) == 0
    assert value(text, "v4serve_model_state", state="not_loaded", model="limited") == 1
    assert value(text, "v4serve_running_requests", **model) == 0
    assert value(text, "v4serve_memory_reserved_bytes", device="host", **model) > 0
    # Nothing was counted for the unknown model: its name is the caller's, not a label.
    assert not any(("no-such-model", "model") in {(v, k) for k, v in labels} for _, labels in samples(text))


async def test_a_request_over_the_model_limits_counts_as_a_429_rejection(server: InProcessServer) -> None:
    async with server.client() as http:
        first = asyncio.ensure_future(http.post("/v4/completions", json=v4(2000, model="limited")))
        # Until the first request runs in the engine: the model's one running slot is taken.
        while not (server.engines.get("limited") and server.engines["limited"].running):
            assert not first.done(), (await first).text
            await asyncio.sleep(0)
        refused = await http.post("/v4/completions", json=v4(5, model="limited"))
        assert refused.status_code == 429, refused.text
        assert (await first).status_code == 200
    text = await scrape(server)
    assert value(text, "v4serve_rejections_total", model="limited", reason="429") == 1
    assert value(text, "v4serve_requests_total", model="limited", route="/v4/completions", status="429") == 1
    assert value(text, "v4serve_requests_total", model="limited", route="/v4/completions", status="200") == 1
    assert value(text, "v4serve_generation_tokens_total", model="limited") == 2000


async def test_a_failure_after_the_stream_began_counts_with_its_status_and_tokens(server: InProcessServer) -> None:
    async with server.client() as http:
        assert (await http.post("/v4/completions", json=v4(1))).status_code == 200
        server.engines["tiny-llama"].fail_after = 3
        response = await http.post("/v4/completions", json=v4(10, stream=True))
    assert response.status_code == 200 and "event: error" in response.text
    text = await scrape(server)
    model = {"model": "tiny-llama", "route": "/v4/completions"}
    assert value(text, "v4serve_requests_total", status="500", **model) == 1
    assert value(text, "v4serve_generation_tokens_total", model="tiny-llama") == 1 + 3


async def test_keep_alive_eviction_is_counted(tmp_path: Path) -> None:
    async with serve_in_process(tmp_path, keep_alive=0.01) as server:
        async with server.client() as http:
            assert (await http.post("/v4/completions", json=v4(1))).status_code == 200

        # The pool's watcher unloads the idle model within a watch interval or two.
        async def evicted() -> str:
            while value(text := await scrape(server), "v4serve_model_evictions_total", model="tiny-llama") < 1:
                await asyncio.sleep(0.05)
            return text

        text = await asyncio.wait_for(evicted(), 30)
    assert value(text, "v4serve_model_state", model="tiny-llama", state="not_loaded") == 1
    assert value(text, "v4serve_memory_reserved_bytes", device="host", model="tiny-llama") == 0


async def test_metrics_need_a_key_unless_opened(tmp_path: Path) -> None:
    async with serve_in_process(tmp_path) as closed:
        async with closed.client(api_key=None) as http:
            response = await http.get("/metrics")
        assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
        await scrape(closed, api_key=OTHER_KEY)  # any valid key, not only an admin's
    async with serve_in_process(tmp_path, metrics_open=True) as opened:
        await scrape(opened, api_key=None)


def test_two_applications_in_one_process_keep_their_own_metrics(tmp_path: Path) -> None:
    """Each application has its own registry: building a second neither fails nor shares series."""
    settings = Settings(home=tmp_path)
    first, second = (state_of(create_app(settings, cached_registry())).telemetry for _ in range(2))
    try:
        first.metrics.model_loads.labels(model="m").inc()
        assert value(first.metrics.render().decode(), "v4serve_model_loads_total", model="m") == 1
        assert value(second.metrics.render().decode(), "v4serve_model_loads_total", model="m") == 0
    finally:
        first.close()
        second.close()


def test_engine_stat_logger_writes_vllm_scheduler_stats_under_the_model_label() -> None:
    """The stat logger handed to vLLM (``stat_loggers``) records each step's statistics;
    vLLM's own ``SchedulerStats`` and ``IterationStats`` are fed to it as its engine would."""
    from vllm.v1.metrics.stats import IterationStats, SchedulerStats

    from server.engines.vllm_engine import stat_logger_factory

    metrics = Metrics()
    factory = stat_logger_factory(metrics.engine("tiny-llama"))
    logger = factory(None, 0)
    iteration = IterationStats()
    iteration.num_preempted_reqs = 2
    logger.record(SchedulerStats(num_running_reqs=3, num_waiting_reqs=1, kv_cache_usage=0.25), iteration)
    logger.record(SchedulerStats(num_running_reqs=5, num_waiting_reqs=0, kv_cache_usage=0.5), None)
    text = metrics.render().decode()
    model = {"model": "tiny-llama"}
    assert value(text, "v4serve_engine_kv_cache_usage_ratio", **model) == 0.5
    assert value(text, "v4serve_engine_waiting_requests", **model) == 0
    assert value(text, "v4serve_engine_preemptions_total", **model) == 2
    assert value(text, "v4serve_engine_batch_size_count", **model) == 2
    assert value(text, "v4serve_engine_batch_size_sum", **model) == 8


def test_a_load_after_a_failure_counts_as_a_restart() -> None:
    metrics = Metrics()
    metrics.loaded("m", 12.0, woken=False, restart=False)
    metrics.loaded("m", 3.0, woken=True, restart=False)
    metrics.loaded("m", 10.0, woken=False, restart=True)
    text = metrics.render().decode()
    assert value(text, "v4serve_model_loads_total", model="m") == 3
    assert value(text, "v4serve_engine_restarts_total", model="m") == 1
    assert value(text, "v4serve_model_load_seconds_count", model="m") == 2
    assert value(text, "v4serve_model_wake_seconds_sum", model="m") == 3.0


async def test_metrics_route_answers_prometheus_text(app_server: InProcessServer) -> None:
    async with app_server.client() as http:
        response = await http.get("/metrics")
    assert response.status_code == 200
    families = {family.name for family in text_string_to_metric_families(response.text)}
    assert {"v4serve_model_state", "v4serve_running_requests", "v4serve_queued_requests"} <= families
    assert isinstance(response, httpx.Response)
