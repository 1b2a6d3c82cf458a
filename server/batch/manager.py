"""The HTTP batch API's jobs: created by ``POST /v1/batches``, run on the server's own
engines behind interactive requests (``server.batch.priority``), resumed after a restart.

A batch's job is ``server.batch.job.run_job`` over its input file, with successes appended
to its output file and failures to its error file, exactly once per line
(``server.batch.results``). Its state is saved at each change of status; the line counts
are read from the result files, so a batch that was running when the server stopped is
picked up at start-up where its files end. Stopping the server does not cancel a batch:
only ``POST /v1/batches/{id}/cancel`` does.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time

from server.batch.endpoints import Endpoints
from server.batch.job import run_job
from server.batch.lines import ENDPOINTS, BatchLine, LineFault, read_input
from server.batch.objects import FINAL_STATES, BatchError, BatchErrors, BatchObject, CreateBatch, FileObject
from server.batch.priority import BatchPriority
from server.batch.results import ResultLog
from server.batch.store import RESULT_PURPOSE, BatchStore, StoredBatch, new_batch_id
from server.errors import InvalidRequestError, ServingError
from server.pool import EnginePool
from server.telemetry import Telemetry

logger = logging.getLogger(__name__)

# The only completion window OpenAI's API takes.
COMPLETION_WINDOW = "24h"
INPUT_PURPOSE = "batch"


class ConflictError(ServingError):
    status_code = 409
    error_type = "conflict"


class BatchManager:
    def __init__(
        self,
        store: BatchStore,
        pool: EnginePool,
        endpoints: Endpoints,
        *,
        max_running: int,
        telemetry: Telemetry | None = None,
    ):
        """With ``telemetry`` (the server's), every line is metered as an HTTP request is:
        the server's metrics, and a usage record for the batch's account."""
        self.store = store
        self._telemetry = telemetry
        self._pool = pool
        self._endpoints = endpoints
        self._max_running = max_running
        self.priority = BatchPriority(pool, max_running)
        # The batches whose jobs run now: their saved state lags their counts (``_live``).
        self._active: dict[str, StoredBatch] = {}
        self._jobs: dict[str, asyncio.Task[None]] = {}
        self._logs: dict[str, ResultLog] = {}
        self._stopping = False

    # ----- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Pick up every batch a previous run of the server left unfinished."""
        for stored in self.store.all_batches():
            status = stored.batch.status
            if status == "cancelling":
                self._end(stored, "cancelled")
            elif status not in FINAL_STATES:
                logger.info("batch %s: resuming (%s)", stored.batch.id, status)
                self._launch(stored)

    async def stop(self) -> None:
        """Stop every job without ending its batch: the next start resumes it."""
        self._stopping = True
        jobs = list(self._jobs.values())
        for job in jobs:
            job.cancel()
        await asyncio.gather(*jobs, return_exceptions=True)

    # ----- requests --------------------------------------------------------------------

    def create(self, request: CreateBatch, owner: str | None, account_id: str | None) -> BatchObject:
        if request.endpoint not in ENDPOINTS:
            raise InvalidRequestError(
                f"endpoint {request.endpoint!r} is not one of {', '.join(ENDPOINTS)}", param="endpoint"
            )
        if request.completion_window != COMPLETION_WINDOW:
            raise InvalidRequestError(
                f"completion_window must be '{COMPLETION_WINDOW}', not {request.completion_window!r}",
                param="completion_window",
            )
        source = self.store.file(request.input_file_id, owner, param="input_file_id")
        if source.purpose != INPUT_PURPOSE:
            raise InvalidRequestError(
                f"file {source.id} was uploaded with purpose '{source.purpose}'; a batch's input needs purpose "
                f"'{INPUT_PURPOSE}'",
                param="input_file_id",
            )
        now = int(time.time())
        batch = BatchObject(
            id=new_batch_id(),
            endpoint=request.endpoint,
            input_file_id=source.id,
            completion_window=request.completion_window,
            status="validating",
            created_at=now,
            expires_at=now + 24 * 3600,
            metadata=request.metadata,
        )
        output = self._result_file(batch.id, "output", owner)
        errors = self._result_file(batch.id, "errors", owner)
        stored = StoredBatch(
            batch=batch, owner=owner, account_id=account_id, output_file=output.id, error_file=errors.id
        )
        self.store.save_batch(stored)
        self._launch(stored)
        return self._live(stored)

    def get(self, batch_id: str, owner: str | None) -> BatchObject:
        return self._live(self.store.batch(batch_id, owner))

    def batches(self, owner: str | None) -> list[BatchObject]:
        """The owner's batches, newest first."""
        batches = [stored for stored in self.store.all_batches() if stored.owner == owner]
        return [self._live(stored) for stored in reversed(batches)]

    async def cancel(self, batch_id: str, owner: str | None) -> BatchObject:
        stored = self.store.batch(batch_id, owner)
        stored = self._active.get(batch_id, stored)
        if stored.batch.status in FINAL_STATES or stored.batch.status == "cancelling":
            if stored.batch.status in ("cancelled", "cancelling"):
                return self._live(stored)
            raise ConflictError(f"batch {batch_id} is {stored.batch.status}; only a running batch can be cancelled")
        stored.batch.status = "cancelling"
        stored.batch.cancelling_at = int(time.time())
        self.store.save_batch(stored)
        job = self._jobs.get(batch_id)
        if job is not None:
            job.cancel()
            await asyncio.gather(job, return_exceptions=True)
        else:
            self._end(stored, "cancelled")
        return self._live(self.store.batch(batch_id, owner))

    # ----- the job ---------------------------------------------------------------------

    def _result_file(self, batch_id: str, kind: str, owner: str | None) -> FileObject:
        return self.store.add_file(b"", f"{batch_id}_{kind}.jsonl", RESULT_PURPOSE, owner)

    def _launch(self, stored: StoredBatch) -> None:
        batch_id = stored.batch.id
        # A context of its own: not that of the HTTP request that created the batch (its
        # request ID would mark every line's logs and errors).
        job = asyncio.create_task(self._run(stored), name=f"batch {batch_id}", context=contextvars.Context())
        self._active[batch_id], self._jobs[batch_id] = stored, job

        def forget(_: asyncio.Task[None]) -> None:
            self._active.pop(batch_id, None)
            self._jobs.pop(batch_id, None)

        job.add_done_callback(forget)

    async def _run(self, stored: StoredBatch) -> None:
        batch = stored.batch
        log: ResultLog | None = None
        try:
            # Off the event loop: an input file may hold hundreds of megabytes, and the
            # result files are read back whole when a batch resumes.
            items = await asyncio.to_thread(self._read_input, stored)
            log = await asyncio.to_thread(
                ResultLog, self.store.content_path(stored.output_file), self.store.content_path(stored.error_file)
            )
            self._logs[batch.id] = log
            batch.request_counts.total = len(items)
            if batch.status == "validating":
                batch.status, batch.in_progress_at = "in_progress", int(time.time())
                self.store.save_batch(stored)
            summary = await run_job(
                items,
                log,
                pool=self._pool,
                endpoints=self._endpoints,
                max_running=self._max_running,
                admission=self.priority.admission,
                account_id=stored.account_id,
                telemetry=self._telemetry,
            )
            batch.status, batch.finalizing_at = "finalizing", int(time.time())
            self.store.save_batch(stored)
            logger.info(
                "batch %s: %d ok, %d failed, %d resumed from a previous run",
                batch.id,
                summary.ok,
                summary.failed,
                summary.skipped,
            )
            self._end(stored, "completed")
        except asyncio.CancelledError:
            if not self._stopping:
                self._end(stored, "cancelled")
            raise
        except Exception as exc:
            logger.exception("batch %s failed", batch.id)
            batch.errors = BatchErrors(data=[BatchError(code="batch_failed", message=type(exc).__name__)])
            self._end(stored, "failed")
        finally:
            self._logs.pop(batch.id, None)
            if log is not None:
                self._count(stored, log)
                log.close()

    def _read_input(self, stored: StoredBatch) -> list[BatchLine | LineFault]:
        return read_input(self.store.content_path(stored.batch.input_file_id), stored.batch.endpoint)

    def _end(self, stored: StoredBatch, status: str) -> None:
        """Put the batch in a final state and name its result files (those holding lines)."""
        batch = stored.batch
        log = self._logs.get(batch.id)
        if log is not None:
            self._count(stored, log)
        now = int(time.time())
        if status == "completed":
            batch.status, batch.completed_at = "completed", now
        elif status == "cancelled":
            batch.status, batch.cancelled_at = "cancelled", now
        else:
            batch.status, batch.failed_at = "failed", now
        batch.output_file_id = stored.output_file if self._holds_lines(stored.output_file) else None
        batch.error_file_id = stored.error_file if self._holds_lines(stored.error_file) else None
        self.store.save_batch(stored)

    def _holds_lines(self, file_id: str) -> bool:
        path = self.store.content_path(file_id)
        return path.exists() and path.stat().st_size > 0

    def _count(self, stored: StoredBatch, log: ResultLog) -> None:
        counts = stored.batch.request_counts
        counts.completed, counts.failed = log.answered.ok, log.answered.failed

    def _live(self, stored: StoredBatch) -> BatchObject:
        """The batch as saved, or while its job runs, as the job has it, counts as of now."""
        stored = self._active.get(stored.batch.id, stored)
        log = self._logs.get(stored.batch.id)
        if log is not None:
            self._count(stored, log)
        return stored.batch
