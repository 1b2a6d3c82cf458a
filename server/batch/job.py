"""One batch job: the input's unanswered lines run, each result appended as it comes.

Shared by ``v4serve batch`` (``server.batch.command``) and the HTTP batch API
(``server.batch.manager``); they differ only in where results go, how many lines run at
once and whether lines yield to interactive requests (``admission``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from server.batch.endpoints import Endpoints, Outcome
from server.batch.lines import BatchLine, LineFault
from server.batch.progress import JobObserver
from server.batch.results import ResultLog, fault_record, result_record
from server.batch.runner import Admission, plan, run_lines, unlimited
from server.pool import EnginePool
from server.telemetry import Telemetry

# How an observer names the lines no engine serves (an unknown or missing model).
NO_MODEL = "(no model)"


@dataclass(frozen=True)
class JobSummary:
    """What this run did: lines answered (ok or failed), and those a previous run had answered."""

    ok: int
    failed: int
    skipped: int
    completion_tokens: int
    seconds: float


class _Observer:
    def model_started(self, model: str, total: int) -> None:
        pass

    def line_done(self, ok: bool, completion_tokens: int) -> None:
        pass

    def model_finished(self) -> None:
        pass


async def run_job(
    items: Sequence[BatchLine | LineFault],
    log: ResultLog,
    *,
    pool: EnginePool,
    endpoints: Endpoints,
    observer: JobObserver | None = None,
    max_running: int | None = None,
    admission: Admission = unlimited,
    account_id: str | None = None,
    telemetry: Telemetry | None = None,
) -> JobSummary:
    """Answer every line of ``items`` that ``log`` does not hold yet, appending to ``log``;
    with ``telemetry``, each line that runs is metered (``server.batch.runner.run_lines``)."""
    started = time.monotonic()
    seen = observer or _Observer()
    todo = [item for item in items if not log.answered.holds(item)]
    ok = failed = tokens = 0
    for item in todo:
        if isinstance(item, LineFault):
            log.write(fault_record(item))
            failed += 1

    def on_result(line: BatchLine, outcome: Outcome) -> None:
        nonlocal ok, failed, tokens
        log.write(result_record(line, outcome))
        ok += outcome.ok
        failed += not outcome.ok
        tokens += outcome.completion_tokens
        seen.line_done(outcome.ok, outcome.completion_tokens)

    lines = [item for item in todo if isinstance(item, BatchLine)]
    for group in plan(lines, pool, max_running):
        seen.model_started(group.engine or NO_MODEL, len(group.lines))
        await run_lines(
            group.lines,
            endpoints,
            on_result,
            concurrency=group.concurrency,
            account_id=account_id,
            admission=admission,
            telemetry=telemetry,
        )
        seen.model_finished()
    return JobSummary(ok, failed, len(items) - len(todo), tokens, time.monotonic() - started)
