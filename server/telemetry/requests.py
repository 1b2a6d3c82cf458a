"""One request's telemetry: what the layers it passes through note, and what its end records.

The HTTP layer opens a ``RequestTelemetry`` when a request arrives and ends it with the
response's last byte; in between it is the current one (a context variable), so the
layers below note what they learn without passing it along: the caller (auth), the model
and account (service), the phases it spent time in (``phase``: auth, image fetch, model
load, queue wait), its tokens as they come (``delta``). Everything is a no-op outside a
request (``current()`` is None then), so a batch job or a test calling the service
directly needs none of it.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from opentelemetry import context as otel_context
from opentelemetry import trace

from server.telemetry.ledger import UsageRecord
from server.telemetry.request_ids import RequestId

if TYPE_CHECKING:
    from server.telemetry.metrics import Metrics

# Statuses that mean the server refused the request rather than failed it or the caller
# sent it wrong: too large, over the model's limits, unavailable (loading, failed, shutting down).
REJECTION_STATUSES = frozenset({413, 429, 503})
# A ledger record's ``source``: an HTTP request, or a batch job's line (``Telemetry.track``).
HTTP = "http"
BATCH = "batch"
# nginx's "client closed request": the caller left before the answer was complete.
CLIENT_CLOSED_REQUEST = 499

_current: contextvars.ContextVar[RequestTelemetry | None] = contextvars.ContextVar("v4serve_request", default=None)


class RequestTelemetry:
    """One HTTP request, from arrival to its last byte (see the module docstring)."""

    def __init__(
        self, request_id: RequestId, method: str, route: str, *, metrics: Metrics, tracer: trace.Tracer | None
    ):
        self.request_id = request_id.value
        self.route = route
        self.arrived = time.monotonic()
        # To the microsecond: what the usage API shows, so a time read back from it finds the record.
        self.arrived_wall = round(time.time(), 6)
        self.status: int | None = None
        self.source = HTTP
        self.key_name: str | None = None
        self.account: str | None = None
        self.model: str | None = None
        self.stream = False
        self.prompt_tokens = 0
        self._choices: dict[int, int] = {}  # completion tokens by choice
        self._last_token: dict[int, float] = {}  # when each choice's last token came
        self.failed_status: int | None = None
        self._metrics = metrics
        self._tracer = tracer
        self._generation_started: int | None = None  # wall-clock ns, for spans
        self._first_token_ns: int | None = None
        self._last_token_ns: int | None = None
        self._span: trace.Span | None = None
        self._otel_token: object | None = None
        if tracer is not None:
            self._span = tracer.start_span(
                f"{method} {route}",
                kind=trace.SpanKind.SERVER,
                attributes={"http.request.method": method, "url.path": route, "v4serve.request_id": self.request_id},
            )
            self._otel_token = otel_context.attach(trace.set_span_in_context(self._span))

    @property
    def completion_tokens(self) -> int:
        return sum(self._choices.values())

    # ----- what the layers note ------------------------------------------------------------

    def caller(self, key_name: str | None, account: str | None) -> None:
        self.key_name, self.account = key_name, account

    def serving(self, model: str, account: str | None) -> None:
        """The request names a registered ``model``; its usage goes to ``account``."""
        self.model, self.account = model, account

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """A child span for the time spent in ``name``."""
        if self._tracer is None:
            yield
            return
        with self._tracer.start_as_current_span(name):
            yield

    def generation_started(self, prompt_tokens: int, *, stream: bool) -> None:
        """The request's engine requests are being submitted."""
        if self._generation_started is None:
            self._generation_started = time.time_ns()
            self.prompt_tokens, self.stream = prompt_tokens, stream

    def delta(self, choice: int, completion_tokens: int) -> None:
        """Choice ``choice`` has ``completion_tokens`` so far; times its new tokens."""
        new = completion_tokens - self._choices.get(choice, 0)
        self._choices[choice] = completion_tokens
        if new <= 0:
            return
        now = time.monotonic()
        self._last_token_ns = time.time_ns()
        if self._first_token_ns is None:
            self._first_token_ns = self._last_token_ns
            if self.stream and self.model is not None:
                self._metrics.time_to_first_token.labels(model=self.model).observe(now - self.arrived)
        previous = self._last_token.get(choice)
        self._last_token[choice] = now
        if previous is not None and self.stream and self.model is not None:
            gap = (now - previous) / new
            histogram = self._metrics.inter_token_latency.labels(model=self.model)
            for _ in range(new):
                histogram.observe(gap)

    def failed(self, status: int) -> None:
        """Generation failed with ``status`` (after the response may have begun)."""
        if self.failed_status is None:
            self.failed_status = status

    # ----- the end -------------------------------------------------------------------------

    def outcome(self, *, completed: bool) -> int:
        """The status the request ended with: a failure's, 499 if the answer was cut off."""
        if self.failed_status is not None:
            return self.failed_status
        if not completed or self.status is None:
            return CLIENT_CLOSED_REQUEST
        return self.status

    def end(self, *, completed: bool) -> UsageRecord | None:
        """Record the metrics; the ledger record to write, if the request served a model."""
        status = self.outcome(completed=completed)
        duration = time.monotonic() - self.arrived
        model = self.model or ""
        if status in REJECTION_STATUSES:
            self._metrics.rejections.labels(model=model, reason=str(status)).inc()
        self._end_spans(status)
        if self.model is None:
            return None
        m = self._metrics
        m.requests.labels(model=model, route=self.route, status=str(status)).inc()
        m.prompt_tokens.labels(model=model).inc(self.prompt_tokens)
        m.generation_tokens.labels(model=model).inc(self.completion_tokens)
        m.request_duration.labels(model=model, route=self.route).observe(duration)
        if self.source == BATCH:
            m.batch_lines.labels(model=model, route=self.route, status=str(status)).inc()
        return UsageRecord(
            time=self.arrived_wall,
            request_id=self.request_id,
            account=self.account,
            key_name=self.key_name,
            model=model,
            route=self.route,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            status=status,
            duration=duration,
            source=self.source,
        )

    def _end_spans(self, status: int) -> None:
        if self._span is None or self._tracer is None:
            return
        # Prefill and decode are known only by their edges (the engine's first and last
        # token), so their spans are made after the fact, with those times. A request
        # answered in one piece (not streamed) has no first-token time: one "generate" span.
        start, first, last = self._generation_started, self._first_token_ns, self._last_token_ns
        if start is not None and first is not None:
            if self.stream:
                self._tracer.start_span("prefill", start_time=start).end(end_time=first)
                if last is not None and last > first:
                    self._tracer.start_span("decode", start_time=first).end(end_time=last)
            else:
                self._tracer.start_span("generate", start_time=start).end(end_time=last or first)
        span = self._span
        span.set_attribute("http.response.status_code", status)
        if self.model is not None:
            span.set_attributes(
                {
                    "v4serve.model": self.model,
                    "v4serve.prompt_tokens": self.prompt_tokens,
                    "v4serve.completion_tokens": self.completion_tokens,
                }
            )
        if status >= 500:
            span.set_status(trace.Status(trace.StatusCode.ERROR))
        span.end()

    def detach(self) -> None:
        """Leave the request's trace context (in the task that entered it)."""
        if self._otel_token is not None:
            otel_context.detach(self._otel_token)  # type: ignore[arg-type]
            self._otel_token = None


def current() -> RequestTelemetry | None:
    """The request being served, or None outside one."""
    return _current.get()


def bind(request: RequestTelemetry) -> contextvars.Token[RequestTelemetry | None]:
    return _current.set(request)


def unbind(token: contextvars.Token[RequestTelemetry | None]) -> None:
    _current.reset(token)


def serving(model: str, account: str | None) -> None:
    """The current request names registered ``model``, its usage going to ``account``."""
    request = _current.get()
    if request is not None:
        request.serving(model, account)


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """A child span of the current request for ``name``; nothing outside a request."""
    request = _current.get()
    if request is None:
        yield
        return
    with request.phase(name):
        yield
