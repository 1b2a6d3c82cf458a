"""OpenTelemetry tracing: a span per request, children for where its time went.

Off unless an endpoint is given (``--otlp-endpoint``) or the standard
``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` variables are set;
then spans are exported over OTLP/HTTP in batches from a background thread. The tracer
provider is the application's own, not OpenTelemetry's global one, so two applications in
one process do not share exporters. ``add_exporter`` is the hook tests (and embedders)
use to receive spans in process.
"""

from __future__ import annotations

import os
from urllib.parse import urlparse

from opentelemetry import propagate
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.trace import Tracer

SERVICE_NAME = "v4serve"
ENV_ENDPOINTS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


def traces_url(endpoint: str) -> str:
    """An OTLP/HTTP collector's base URL (``http://collector:4318``) -> its traces URL."""
    parsed = urlparse(endpoint)
    if parsed.path in ("", "/"):
        return endpoint.rstrip("/") + "/v1/traces"
    return endpoint


class Tracing:
    def __init__(self, endpoint: str | None = None):
        self.endpoint = endpoint
        self._provider: TracerProvider | None = None
        from_env = any(os.environ.get(name) for name in ENV_ENDPOINTS)
        if endpoint or from_env:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            # Without an endpoint of ours the exporter reads the OTEL_* variables itself.
            exporter = OTLPSpanExporter(endpoint=traces_url(endpoint)) if endpoint else OTLPSpanExporter()
            self._ensure_provider().add_span_processor(BatchSpanProcessor(exporter))

    @property
    def traces_url(self) -> str | None:
        """The OTLP/HTTP traces URL of ``--otlp-endpoint``, for engines that trace too."""
        return traces_url(self.endpoint) if self.endpoint else None

    @property
    def enabled(self) -> bool:
        return self._provider is not None

    @property
    def tracer(self) -> Tracer | None:
        return self._provider.get_tracer("server.telemetry") if self._provider is not None else None

    def add_exporter(self, exporter: SpanExporter) -> None:
        """Send every span to ``exporter`` as it ends (in the thread that ends it)."""
        self._ensure_provider().add_span_processor(SimpleSpanProcessor(exporter))

    def shutdown(self) -> None:
        """Flush and stop the exporters."""
        if self._provider is not None:
            self._provider.shutdown()

    def _ensure_provider(self) -> TracerProvider:
        if self._provider is None:
            self._provider = TracerProvider(resource=Resource.create({"service.name": SERVICE_NAME}))
        return self._provider


def trace_headers() -> dict[str, str] | None:
    """The current span's W3C ``traceparent`` headers, for an engine that traces too
    (vLLM's ``otlp_traces_endpoint``): its spans then join the request's trace."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier or None
