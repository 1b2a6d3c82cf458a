"""Tracing: one span per request, children for where its time went, in process.

Spans are received by OpenTelemetry's in-memory exporter through the telemetry's test
hook (``Tracing.add_exporter``), and, for the OTLP path, by a tiny OTLP/HTTP receiver in
this process that decodes what the server's real exporter sends.
"""

from __future__ import annotations

import base64
import contextlib
import io
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from PIL import Image

from server.api import state_of
from server.telemetry.tracing import traces_url
from tests.conftest import FIXTURES
from tests.in_process import InProcessServer, cached_registry, serve_in_process

GOOD = {"model": "tiny-llama", "prompt": "one two", "model_parameters": {"max_tokens": 3}}


def tree(spans: tuple[ReadableSpan, ...], root_name: str) -> tuple[ReadableSpan, list[str]]:
    """The one root span named ``root_name`` and the names of its children, in start order."""
    (root,) = [span for span in spans if span.name == root_name and span.parent is None]
    assert root.context is not None
    children = [span for span in spans if span.parent is not None and span.parent.span_id == root.context.span_id]
    assert all(span.context is not None and span.context.trace_id == root.context.trace_id for span in children)
    return root, [span.name for span in sorted(children, key=lambda span: span.start_time or 0)]


def traced(server: InProcessServer) -> InMemorySpanExporter:
    exporter = InMemorySpanExporter()
    state_of(server.app).telemetry.tracing.add_exporter(exporter)
    return exporter


async def test_a_streamed_request_is_a_span_tree(tmp_path: Path) -> None:
    async with serve_in_process(tmp_path) as server:
        exporter = traced(server)
        async with server.client(headers={"x-request-id": "trace-me"}) as http:
            response = await http.post("/v4/completions", json={**GOOD, "stream": True})
        assert response.status_code == 200
        root, children = tree(exporter.get_finished_spans(), "POST /v4/completions")
    # The first request for the model waits for its load.
    assert children == ["auth", "model load", "queue wait", "prefill", "decode"]
    assert root.attributes is not None
    assert root.attributes["v4serve.request_id"] == "trace-me"
    assert root.attributes["http.response.status_code"] == 200
    assert root.attributes["v4serve.model"] == "tiny-llama"
    assert root.attributes["v4serve.completion_tokens"] == 3
    spans = {span.name: span for span in exporter.get_finished_spans()}
    # prefill ends where decode begins: the first token.
    assert spans["prefill"].end_time == spans["decode"].start_time


async def test_a_request_in_one_piece_has_one_generate_span_and_no_load_once_loaded(
    app_server: InProcessServer,
) -> None:
    exporter = traced(app_server)
    async with app_server.client() as http:
        await http.post("/v4/completions", json=GOOD)
        exporter.clear()
        await http.post("/v4/completions", json=GOOD)
    _, children = tree(exporter.get_finished_spans(), "POST /v4/completions")
    assert children == ["auth", "queue wait", "generate"]


def png_data_url() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


async def test_image_fetch_is_a_child_span(tmp_path: Path) -> None:
    registry = cached_registry(FIXTURES / "vision_overlay.yaml")
    async with serve_in_process(tmp_path, registry=registry) as server:
        exporter = traced(server)
        body = {
            "model": "tiny-llava",
            "prompt": "<image> what is this",
            "images": [{"image_url": png_data_url()}],
            "model_parameters": {"max_tokens": 2},
        }
        async with server.client() as http:
            response = await http.post("/v4/completions", json=body)
        assert response.status_code == 200, response.text
        _, children = tree(exporter.get_finished_spans(), "POST /v4/completions")
    assert children == ["auth", "image fetch", "model load", "queue wait", "generate"]


async def test_a_refused_request_is_a_span_with_its_status(app_server: InProcessServer) -> None:
    exporter = traced(app_server)
    async with app_server.client(api_key=None) as http:
        assert (await http.post("/v4/completions", json=GOOD)).status_code == 401
    root, children = tree(exporter.get_finished_spans(), "POST /v4/completions")
    assert children == ["auth"]
    assert root.attributes is not None and root.attributes["http.response.status_code"] == 401


@pytest.fixture
def otlp_receiver() -> Iterator[tuple[str, list[ExportTraceServiceRequest]]]:
    with otlp_collector() as collected:
        yield collected


@contextlib.contextmanager
def otlp_collector() -> Iterator[tuple[str, list[ExportTraceServiceRequest]]]:
    """An OTLP/HTTP collector in this process: its URL, and what arrives at /v1/traces, decoded."""
    received: list[ExportTraceServiceRequest] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["content-length"]))
            if self.path == "/v1/traces":
                received.append(ExportTraceServiceRequest.FromString(body))
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{http.server_address[1]}", received
    http.shutdown()
    thread.join()


async def test_otlp_endpoint_receives_the_trace(
    tmp_path: Path, otlp_receiver: tuple[str, list[ExportTraceServiceRequest]]
) -> None:
    endpoint, received = otlp_receiver
    async with serve_in_process(tmp_path, otlp_endpoint=endpoint) as server:
        async with server.client() as http:
            assert (await http.post("/v4/completions", json={**GOOD, "stream": True})).status_code == 200
    # Leaving the application flushes its exporter.
    names = [
        span.name
        for request in received
        for resource in request.resource_spans
        for scope in resource.scope_spans
        for span in scope.spans
    ]
    assert sorted(names) == sorted(["POST /v4/completions", "auth", "model load", "queue wait", "prefill", "decode"])
    service = {
        attribute.value.string_value
        for request in received
        for resource in request.resource_spans
        for attribute in resource.resource.attributes
        if attribute.key == "service.name"
    }
    assert service == {"v4serve"}


def test_collector_urls() -> None:
    assert traces_url("http://collector:4318") == "http://collector:4318/v1/traces"
    assert traces_url("http://collector:4318/") == "http://collector:4318/v1/traces"
    assert traces_url("http://collector:4318/custom/path") == "http://collector:4318/custom/path"


def test_vllm_gets_the_traces_endpoint() -> None:
    """vLLM's own tracing hook: the engine arguments carry the endpoint when one is set."""
    from server.engines.vllm_engine import build_engine_args

    entry = cached_registry().resolve("tiny-llama")
    assert entry is not None
    args = build_engine_args(
        "tiny-llama", entry.entry, "/weights", on_cpu=True, adapters=(), traces_endpoint="http://collector:4317"
    )
    assert args.otlp_traces_endpoint == "http://collector:4317"
    untraced = build_engine_args("tiny-llama", entry.entry, "/weights", on_cpu=True, adapters=())
    assert untraced.otlp_traces_endpoint is None
