"""The ``Telemetry`` object an application owns: its metrics, usage ledger and tracing."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from server.settings import Settings
from server.telemetry import request_ids, requests
from server.telemetry.ledger import Ledger
from server.telemetry.metrics import Metrics
from server.telemetry.request_ids import RequestId
from server.telemetry.requests import RequestTelemetry
from server.telemetry.tracing import Tracing

logger = logging.getLogger(__name__)

# How long a response's last byte waits for its ledger record to be committed. Past it
# the answer goes out anyway (a stuck database must not stop serving) and the record is
# still written when the database comes back; the log says so.
LEDGER_WAIT_SECONDS = 10.0


class Telemetry:
    def __init__(self, *, metrics: Metrics | None = None, ledger: Ledger | None = None, tracing: Tracing | None = None):
        self.metrics = metrics or Metrics()
        self.ledger = ledger
        self.tracing = tracing or Tracing()

    @classmethod
    def from_settings(cls, settings: Settings) -> Telemetry:
        return cls(
            ledger=Ledger.at(settings.home, settings.ledger_url),
            tracing=Tracing(settings.otlp_endpoint),
        )

    def begin(self, request_id: RequestId, method: str, route: str) -> RequestTelemetry:
        return RequestTelemetry(request_id, method, route, metrics=self.metrics, tracer=self.tracing.tracer)

    async def end(self, request: RequestTelemetry, *, completed: bool) -> None:
        """Record ``request``'s metrics and, for a generation request, its ledger record;
        returns once the record is committed (or after ``LEDGER_WAIT_SECONDS``)."""
        record = request.end(completed=completed)
        if record is None or self.ledger is None:
            return
        written = self.ledger.write(record)
        try:
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(written)), LEDGER_WAIT_SECONDS)
        except TimeoutError:
            logger.error("usage ledger: record not committed after %.0f s; answering anyway", LEDGER_WAIT_SECONDS)
        except Exception:
            logger.error("usage ledger: the request's record was not written (see the error above)")

    @contextlib.asynccontextmanager
    async def track(
        self, route: str, *, key_name: str | None = None, account: str | None = None, source: str = requests.BATCH
    ) -> AsyncIterator[RequestTelemetry]:
        """One request that did not come over HTTP (a batch job's line), metered and
        recorded as an HTTP request is, its record marked with ``source``: the layers below
        note what they learn on it, and take its request ID, while it is current. The
        caller sets its ``status`` (200, or the error's status) before leaving; left
        without one, it counts as abandoned (499)."""
        request_id = request_ids.accept(None)
        id_token = request_ids.bind(request_id)
        request = self.begin(request_id, "POST", route)
        request.caller(key_name, account)
        request.source = source
        request_token = requests.bind(request)
        try:
            yield request
        finally:
            await self.end(request, completed=request.status is not None)
            request.detach()
            requests.unbind(request_token)
            request_ids.unbind(id_token)

    def close(self) -> None:
        if self.ledger is not None:
            self.ledger.close()
        self.tracing.shutdown()
