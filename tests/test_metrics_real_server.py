"""Metrics, JSON logs and the usage ledger of a real server with a real vLLM engine.

One ``v4serve serve`` process (tiny-llama preloaded, ``--log-format json``, its ledger in
a file of this module's own): known requests give exact counters and ledger totals, vLLM's
own scheduler statistics reach ``/metrics`` under the model's label, and, last, the server
is killed with SIGKILL under load: every request whose answer had arrived is in the ledger.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from server.telemetry import Ledger, UsageFilter
from tests.conftest import API_KEYS, RunningServer, start_server
from tests.test_metrics import samples, value
from tests.test_tracing import otlp_collector

pytestmark = pytest.mark.slow

ADMIN_KEY = "admin-key"
MODEL = {"model": "tiny-llama"}


@pytest.fixture(scope="module")
def ledger_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ledger") / "usage.sqlite3"


@pytest.fixture(scope="module")
def collector() -> Iterator[tuple[str, list[ExportTraceServiceRequest]]]:
    with otlp_collector() as collected:
        yield collected


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, ledger_path: Path, collector: tuple[str, list]
) -> Iterator[RunningServer]:
    running = start_server(
        tmp_path_factory.mktemp("metrics-server"),
        preload=["tiny-llama"],
        api_keys=f"{API_KEYS},{ADMIN_KEY}::admin",
        extra_args=[
            *("--log-format", "json", "--ledger-url", f"sqlite://{ledger_path}"),
            *("--otlp-endpoint", collector[0]),
        ],
    )
    yield running
    running.stop()


def complete(http: httpx.Client, *, stream: bool, request_id: str | None = None) -> tuple[int, int]:
    """One /v4/completions request; its (prompt, completion) token usage."""
    body = {"model": "tiny-llama", "prompt": "The capital of France is", "stream": stream}
    body["model_parameters"] = {"max_tokens": 6, "temperature": 0}
    headers = {"x-request-id": request_id} if request_id else {}
    if not stream:
        response = http.post("/v4/completions", json=body, headers=headers)
        assert response.status_code == 200, response.text
        usage = response.json()["token_usage"]
        return usage["prompt"], usage["completion"]
    with http.stream("POST", "/v4/completions", json=body, headers=headers) as response:
        assert response.status_code == 200
        events = [json.loads(line[len("data: ") :]) for line in response.iter_lines() if line.startswith("data: ")]
    usage = events[-1]["token_usage"]
    return usage["prompt"], usage["completion"]


def test_known_requests_give_exact_counters_and_ledger_totals(server: RunningServer) -> None:
    with server.client() as http:
        usages = [complete(http, stream=False) for _ in range(3)]
        usages += [complete(http, stream=True, request_id=f"stream-{n}") for n in range(2)]
        text = http.get("/metrics").text
    prompt, completion = sum(u[0] for u in usages), sum(u[1] for u in usages)
    assert value(text, "v4serve_requests_total", route="/v4/completions", status="200", **MODEL) == 5
    assert value(text, "v4serve_prompt_tokens_total", **MODEL) == prompt
    assert value(text, "v4serve_generation_tokens_total", **MODEL) == completion
    assert value(text, "v4serve_time_to_first_token_seconds_count", **MODEL) == 2
    assert value(text, "v4serve_model_loads_total", **MODEL) == 1
    assert value(text, "v4serve_model_state", state="ready", **MODEL) == 1
    # vLLM's scheduler statistics, through the stat logger the engine was started with:
    # every engine step that ran a request is one batch-size observation.
    assert value(text, "v4serve_engine_batch_size_count", **MODEL) >= completion / 5
    assert ("v4serve_engine_kv_cache_usage_ratio", frozenset(MODEL.items())) in samples(text)
    with server.client(ADMIN_KEY) as admin:
        totals = admin.get("/v4/usage", params={"model": "tiny-llama"}).json()["totals"]
    assert totals == {
        "requests": 5,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def test_log_lines_are_json_and_name_their_request(server: RunningServer) -> None:
    with server.client() as http:
        complete(http, stream=False, request_id="json-log-1")
    ours = []
    for line in server.log().splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry.get("logger", "").startswith("server"):
                ours.append(entry)
    assert ours, server.log_tail()
    usage_lines = [entry for entry in ours if entry.get("request_id") == "json-log-1"]
    assert any(entry["message"].startswith("completion cmpl-json-log-1-") for entry in usage_lines), usage_lines


def test_vllm_spans_join_the_request_trace(
    server: RunningServer, collector: tuple[str, list[ExportTraceServiceRequest]]
) -> None:
    """vLLM's own span of a request (``llm_request``, from the engine the server started
    with ``otlp_traces_endpoint``) lands in the request's trace, under the server's span."""
    _, received = collector
    with server.client() as http:
        _, completion = complete(http, stream=True, request_id="traced-1")

    def found() -> tuple[Any, Any] | None:
        spans = [
            (resource.resource, span)
            for request in list(received)
            for resource in request.resource_spans
            for scope in resource.scope_spans
            for span in scope.spans
        ]
        roots = [
            span
            for _, span in spans
            if any(a.key == "v4serve.request_id" and a.value.string_value == "traced-1" for a in span.attributes)
        ]
        engine = [(resource, span) for resource, span in spans if span.name == "llm_request"]
        for root in roots:
            ours = {span.span_id for _, span in spans if span.trace_id == root.trace_id}
            for resource, span in engine:
                if span.trace_id == root.trace_id and span.parent_span_id in ours:
                    return resource, span
        return None

    # Both sides export in batches (every few seconds): wait for the spans, not for a time.
    deadline = time.monotonic() + 120
    while (pair := found()) is None:
        assert time.monotonic() < deadline, "no llm_request span of vLLM's joined the request's trace"
        time.sleep(0.5)
    resource, span = pair
    service = {a.value.string_value for a in resource.attributes if a.key == "service.name"}
    assert service and service != {"v4serve"}, service  # vLLM's own exporter sent it
    assert any(a.key == "gen_ai.usage.completion_tokens" and a.value.int_value == completion for a in span.attributes)


def test_kill_9_under_load_loses_no_answered_request(server: RunningServer, ledger_path: Path) -> None:
    """Eight clients send requests until 40 answers have arrived; the client that gets the
    40th kills the server (SIGKILL, engines included) at once, with the others' requests
    in flight. Every request whose answer arrived in full is in the ledger. (That an answer
    waits for its record's commit, which makes this hold whatever the timing, is shown
    deterministically in tests/test_ledger.py::test_the_last_byte_waits_for_the_commit.)"""
    answered: list[str] = []
    lock = threading.Lock()
    enough = threading.Event()

    def client(n: int) -> None:
        with server.client(timeout=300) as http:
            for i in range(1000):
                if enough.is_set():
                    return
                request_id = f"load-{n}-{i}"
                try:
                    complete(http, stream=i % 2 == 1, request_id=request_id)
                except (httpx.TransportError, AssertionError):
                    return  # the server was killed under this request
                with lock:
                    answered.append(request_id)
                    if len(answered) == 40:
                        os.killpg(server.process.pid, signal.SIGKILL)  # the server and its engines
                        enough.set()

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    assert enough.wait(600), "the load never reached 40 answers"
    server.process.wait()
    for thread in threads:
        thread.join(60)
    with lock:
        done = list(answered)
    found = Ledger(ledger_path, writable=False).query(UsageFilter(limit=100_000)).rows
    recorded = {row.request_id for row in found}
    assert set(done) <= recorded, sorted(set(done) - recorded)
