"""Running batch lines through the engine pool: which model first, and many at once.

``plan`` groups lines by the engine that serves them (an alias and a LoRA adapter share
their base's) and orders the groups so each engine is loaded once: lines no engine can
serve first (an unknown model fails without a load), then engines already loaded, then
the rest in the order the input first names them. ``run_lines`` feeds one group's lines
to its engine with up to ``concurrency`` requests in flight, so the engine batches them
as it batches concurrent HTTP requests, and hands each answer to ``on_result`` as it
comes. Where the results go (``server.batch.results``) and where the lines run are
separate: another runner (a cluster's) can reuse ``run_lines`` and the same result log.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass

from server.batch.endpoints import Busy, Endpoints, Outcome
from server.batch.lines import BatchLine
from server.errors import ModelNotFoundError
from server.pool import EnginePool, ModelState
from server.telemetry import RequestTelemetry, Telemetry, UsageRecord

# A line whose model cannot serve (503) is tried this many times before its answer is the 503.
UNAVAILABLE_ATTEMPTS = 3
# The longest wait between tries of a line refused with 429 or 503.
MAX_RETRY_SECONDS = 30.0

# The key name a metered line's usage record carries: a line is sent by no API key (the
# record's ``source`` is ``batch`` too, which no HTTP request's is).
KEY_NAME = "batch"

# Held while one line runs: where a server makes batch lines yield to interactive ones
# (``server.batch.priority``). Takes the line's model.
Admission = Callable[[str | None], AbstractAsyncContextManager[None]]


class HeldRecords(Telemetry):
    """Meters lines as the local job does (``run_lines`` with it as ``telemetry``: the same
    ``Telemetry.track``, so the same usage record, fields and request ID), but holds each
    answered line's record instead of writing it, for whoever decides whether the answer
    counts: a Ray host sends it to the driver with the line's result, and the driver writes
    it only when it appends that result to the output (``server.batch.ray_job``). A line
    cut off before its answer (its host stopped) holds no record: it runs again elsewhere."""

    def __init__(self) -> None:
        super().__init__()
        self._held: dict[str, UsageRecord] = {}

    async def end(self, request: RequestTelemetry, *, completed: bool) -> None:
        record = request.end(completed=completed)
        if record is not None and completed:
            self._held[record.request_id] = record

    def take(self, request_id: str) -> UsageRecord | None:
        """The record of the answered line whose ``Outcome.request_id`` is ``request_id``;
        None for a line refused before a model was known (which an HTTP request has none of)."""
        return self._held.pop(request_id, None)


@dataclass(frozen=True)
class ModelGroup:
    """The lines one engine serves (``engine`` None: lines that name no model it knows)."""

    engine: str | None
    lines: list[BatchLine]
    concurrency: int


def plan(lines: Sequence[BatchLine], pool: EnginePool, max_running: int | None = None) -> list[ModelGroup]:
    """The lines grouped by serving engine, in the order that loads each engine once.

    A group's ``concurrency`` is its engine's ``max_running`` (its admission limit), cut
    to ``max_running`` when given: more would only queue at the gate.
    """
    groups: dict[str | None, list[BatchLine]] = {}
    for line in lines:
        groups.setdefault(_engine_of(line, pool), []).append(line)
    loaded = {status.model_id for status in pool.status() if status.state is ModelState.READY}
    order = sorted(groups, key=lambda engine: 0 if engine is None else 1 if engine in loaded else 2)
    planned = []
    for engine in order:
        limit = pool.lookup(engine).entry.max_running if engine is not None else len(groups[engine])
        if max_running is not None:
            limit = min(limit, max_running)
        planned.append(ModelGroup(engine, groups[engine], max(1, limit)))
    return planned


def _engine_of(line: BatchLine, pool: EnginePool) -> str | None:
    if line.model is None:
        return None
    try:
        registered = pool.lookup(line.model)
    except ModelNotFoundError:
        return None
    return registered.entry.base or registered.model_id


@contextlib.asynccontextmanager
async def unlimited(_: str | None) -> AsyncIterator[None]:
    yield


async def run_lines(
    lines: Sequence[BatchLine],
    endpoints: Endpoints,
    on_result: Callable[[BatchLine, Outcome], None],
    *,
    concurrency: int,
    account_id: str | None = None,
    admission: Admission = unlimited,
    telemetry: Telemetry | None = None,
) -> None:
    """Answer every line, ``concurrency`` at a time, calling ``on_result`` as each ends.

    With ``telemetry``, each line is metered as an HTTP request is (``_metered``).
    Cancelling this cancels the lines in flight (which aborts them in the engine); their
    ``on_result`` is never called, so a resumed job runs them again.
    """
    pending: Iterator[BatchLine] = iter(lines)

    async def worker() -> None:
        # One shared iterator: each worker takes the next line when it is free.
        for line in pending:
            on_result(line, await _metered(line, endpoints, account_id, admission, telemetry))

    workers = [asyncio.ensure_future(worker()) for _ in range(min(concurrency, len(lines)))]
    try:
        await asyncio.gather(*workers)
    finally:
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)


async def _metered(
    line: BatchLine, endpoints: Endpoints, account_id: str | None, admission: Admission, telemetry: Telemetry | None
) -> Outcome:
    """The line's answer; with ``telemetry``, one request in its metrics and usage ledger,
    however many tries it took, recorded before the answer is handed on: a line in the
    output has its record (a line cut off by cancelling has its 499 record, and runs again)."""
    if telemetry is None:
        return await _answer(line, endpoints, account_id, admission)
    async with telemetry.track(line.url, key_name=KEY_NAME, account=account_id) as request:
        outcome = await _answer(line, endpoints, account_id, admission)
        request.status = outcome.status
    return outcome


async def _answer(line: BatchLine, endpoints: Endpoints, account_id: str | None, admission: Admission) -> Outcome:
    """The line's answer; a 429 is waited out and tried again, a 503 too, a few times."""
    unavailable = 0
    body = line.body  # read from the input once, however many tries it takes
    while True:
        async with admission(line.model):
            try:
                return await endpoints.call(line.url, body, account_id)
            except Busy as exc:
                if exc.outcome.status == 503:
                    unavailable += 1
                    if unavailable >= UNAVAILABLE_ATTEMPTS:
                        return exc.outcome
                wait = min(MAX_RETRY_SECONDS, exc.retry_after or 1.0)
        await asyncio.sleep(wait)
