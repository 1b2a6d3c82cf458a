"""What the server tells its operators: metrics, request IDs, the usage ledger and tracing.

The lowest layer above the leaf modules: every layer may call it. The application owns
one ``Telemetry`` (``create_app`` builds it from the settings); the layers a request
passes through note what they learn on the request's ``RequestTelemetry``
(``server.telemetry.current()``), and the pool reports its state to ``Metrics``.
"""

from server.telemetry.core import Telemetry
from server.telemetry.ledger import Ledger, UsageFilter, UsageRecord, UsageReport, UsageTotals
from server.telemetry.metrics import EngineMetrics, Metrics
from server.telemetry.request_ids import current_request_id, engine_request_id
from server.telemetry.requests import RequestTelemetry, current, phase, serving
from server.telemetry.tracing import Tracing, trace_headers

__all__ = [
    "EngineMetrics",
    "Ledger",
    "Metrics",
    "RequestTelemetry",
    "Telemetry",
    "Tracing",
    "UsageFilter",
    "UsageRecord",
    "UsageReport",
    "UsageTotals",
    "current",
    "current_request_id",
    "engine_request_id",
    "phase",
    "serving",
    "trace_headers",
]
