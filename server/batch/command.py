"""``v4serve batch INPUT OUTPUT``: a file of requests run on this machine's engines.

The job builds the same engine pool and services as ``v4serve serve`` (no HTTP server),
runs every line the output does not hold yet (``server.batch.job``), and exits 0 once
every line is answered, whether its request succeeded or not; 2 when the input cannot be
read or the output cannot be written, 1 when the job stops before the end (it may be run
again: it resumes).

Each line that runs is recorded in the usage ledger the server keeps (SQLite under
``--home``, or ``--ledger-url``), as a request with ``source`` ``batch`` and key name
``batch``: a cluster running evaluations sees them in ``v4serve usage`` next to its HTTP
traffic. ``ledger=False`` (``--no-ledger``) skips it. Lines run with ``--ray`` are recorded
the same way, by this process as their results arrive (``server.batch.ray_job``).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TextIO

from server.batch.endpoints import Endpoints
from server.batch.job import JobSummary, run_job
from server.batch.lines import BatchLine, LineFault, read_input
from server.batch.progress import Progress, summary
from server.batch.results import OutputBusyError, ResultLog
from server.registry import Registry, load_registry
from server.service.stack import build_stack
from server.settings import Settings
from server.telemetry import Ledger, Telemetry

logger = logging.getLogger("server.batch")


def run_batch(settings: Settings, input_path: Path, output_path: Path, *, ledger: bool = True) -> int:
    """Run the job; its exit status (see the module docstring). Progress goes to stderr
    (live on a terminal), the one-line summary to stdout."""
    registry = load_registry(settings.registry_files)
    try:
        items = read_input(input_path)
    except OSError as exc:
        print(f"v4serve batch: cannot read {input_path}: {exc}", file=sys.stderr)
        return 2
    try:
        log = ResultLog(output_path)
    except (OSError, OutputBusyError) as exc:
        print(f"v4serve batch: cannot write {output_path}: {exc}", file=sys.stderr)
        return 2
    telemetry: Telemetry | None = None
    if ledger:
        try:
            telemetry = Telemetry(ledger=Ledger.at(settings.home, settings.ledger_url))
        except Exception as exc:
            log.close()
            print(f"v4serve batch: cannot open the usage ledger: {exc} (--no-ledger runs without)", file=sys.stderr)
            return 2
    job: Coroutine[Any, Any, JobSummary]
    if settings.ray_address is not None:
        # Across a Ray cluster (server.batch.ray_job); Ray is imported only with --ray.
        from server.batch.ray_job import run_on_ray

        job = run_on_ray(settings, registry, items, log, sys.stderr, telemetry.ledger if telemetry else None)
    else:
        job = _run(settings, registry, items, log, sys.stderr, telemetry)
    try:
        done = asyncio.run(job)
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("v4serve batch: stopped; run the same command again to finish the rest", file=sys.stderr)
        return 1
    except Exception:
        logger.exception("v4serve batch: the job failed; run the same command again to finish the rest")
        return 1
    finally:
        log.close()
        if telemetry is not None:
            telemetry.close()  # commits the records still queued
    print(summary(done.ok, done.failed, done.skipped, done.completion_tokens, done.seconds), flush=True)
    return 0


async def _run(
    settings: Settings,
    registry: Registry,
    items: list[BatchLine | LineFault],
    log: ResultLog,
    stream: TextIO,
    telemetry: Telemetry | None,
) -> JobSummary:
    stack = build_stack(settings, registry)
    # SIGTERM stops the job as Ctrl-C does: lines in flight are aborted, engines shut down.
    main = asyncio.current_task()
    assert main is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main.cancel)
    try:
        await stack.pool.start(())
        return await run_job(
            items,
            log,
            pool=stack.pool,
            endpoints=Endpoints(stack.service, stack.chat),
            observer=Progress(stream),
            telemetry=telemetry,
        )
    finally:
        await stack.close()
