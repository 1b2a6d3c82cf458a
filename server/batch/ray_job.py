"""``v4serve batch ... --ray ADDRESS``: one job's lines run on engine hosts across a Ray cluster.

The driver (this process; it needs no GPU) reads the input and the output as the local
job does (``server.batch.command``), writes the faulty lines' answers itself, and cuts
each model's lines (``runner.plan``'s groups, in its order) into shards. One host actor
per node (or GPU set, or ``--ray-replica-resource``) holds an engine pool and runs the
shards it is given with the local runner (``runner.run_lines``), streaming each line's
result back as it ends; the driver appends it to the output (``results.ResultLog``) unless
the output already holds that ``custom_id``. So the output holds every line exactly once,
and re-running the command after a crash resumes it, as on one machine.

Usage and progress are the driver's too, from the results it accepts. A host meters its
lines as the local job does (``runner.HeldRecords``: the same usage record) but only sends
each record along with its line's result; the driver commits the records of the results
it appends to the ledger before appending them, and drops those of results it drops. So
the ledger holds one record per output line that reached a model, as on one machine. A
lost host's unfinished lines sent nothing and leave no record (the local job records a
line it cuts off as 499); they are recorded where they run again. The live per-model
line (``progress.Progress``) counts accepted results, several models at once.

A host takes the next shard of the model it ran last, else the next in order, so models
stay loaded where they are while every host stays busy. A host that is lost mid-job (Ray
raises ``RayActorError`` on its stream) costs only the lines of its shard whose results had
not arrived: they go back to the front of the queue, for the other hosts. Lines whose
results arrived are not run again.

Why actors and tasks rather than Ray Data: docs/batch.md, "Ray".
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import os
import signal
import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

import ray
from ray.exceptions import RayActorError, RayTaskError

from server.batch.endpoints import Endpoints, Outcome
from server.batch.job import NO_MODEL, JobSummary
from server.batch.lines import BatchLine, LineFault
from server.batch.progress import Progress
from server.batch.ray_hosts import Placement, actor_options, connect, placements
from server.batch.results import ResultLog, fault_record, result_record
from server.batch.runner import HeldRecords, plan, run_lines
from server.pool import EnginePool
from server.registry import Registry
from server.service.stack import ServiceStack, build_stack
from server.settings import Settings
from server.telemetry import Ledger, UsageRecord
from server.telemetry.core import LEDGER_WAIT_SECONDS

logger = logging.getLogger("server.batch")

# Shards per model per host: more than one, so a host that finishes early takes work
# from the others and a lost host costs less; few, so each shard still fills a batch.
SHARDS_PER_HOST = 2
# How long a host may take to start (imports, engine pool) before the job goes on without it.
HOST_START_SECONDS = 600.0


class NoHostsError(RuntimeError):
    """No engine host is left to run the job's remaining lines."""


@dataclass(frozen=True, slots=True)
class Shard:
    engine: str | None  # the model whose engine serves these lines (None: no model does)
    lines: list[BatchLine]
    concurrency: int


@dataclass(frozen=True, slots=True)
class LineResult:
    """One line's answer, as a host sends it back."""

    custom_id: str
    record: dict[str, Any]
    ok: bool
    completion_tokens: int
    usage: UsageRecord | None  # its usage record, when metered and the line reached a model


class BatchHost:
    """An engine pool on one node, running shards of lines; an async Ray actor once wrapped.
    ``metered``: each result carries its line's usage record (``runner.HeldRecords``)."""

    def __init__(self, settings: Settings, registry: Registry, metered: bool):
        logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self._stack: ServiceStack = build_stack(settings, registry)
        self._endpoints = Endpoints(self._stack.service, self._stack.chat)
        self._usage = HeldRecords() if metered else None

    async def start(self) -> int:
        """Start the pool's watcher; this host's process ID (for operators and tests)."""
        await self._stack.pool.start(())
        return os.getpid()

    async def run(self, lines: Sequence[BatchLine], concurrency: int) -> AsyncGenerator[list[LineResult], None]:
        """The lines' results as they end (``runner.run_lines``, the local job's runner),
        each time all that ended since the last were sent: the driver commits their usage
        records in one go, so a host answering faster than a commit sends bigger chunks."""
        results: asyncio.Queue[LineResult] = asyncio.Queue()
        usage = self._usage

        def on_result(line: BatchLine, outcome: Outcome) -> None:
            record = result_record(line, outcome)
            held = usage.take(outcome.request_id) if usage is not None else None
            results.put_nowait(LineResult(line.custom_id, record, outcome.ok, outcome.completion_tokens, held))

        running = asyncio.ensure_future(
            run_lines(lines, self._endpoints, on_result, concurrency=concurrency, telemetry=usage)
        )
        try:
            while not (running.done() and results.empty()):
                waiting = asyncio.ensure_future(results.get())
                await asyncio.wait({waiting, running}, return_when=asyncio.FIRST_COMPLETED)
                if waiting.done():
                    chunk = [waiting.result()]
                    while not results.empty():
                        chunk.append(results.get_nowait())
                    yield chunk
                else:
                    waiting.cancel()
            running.result()  # a runner that failed fails the shard
        finally:
            running.cancel()

    async def shutdown(self) -> None:
        await self._stack.close()
        if self._usage is not None:
            self._usage.close()


def shards(lines: Sequence[BatchLine], settings: Settings, registry: Registry, hosts: int) -> list[Shard]:
    """Each model's lines (``plan``'s groups, in its order) cut into about
    ``SHARDS_PER_HOST`` shards per host."""
    # A pool that never starts an engine: ``plan`` asks it only which engine serves a line.
    lookup = EnginePool(registry, home=settings.home, local_weights=False)
    cut = []
    for group in plan(lines, lookup):
        size = max(1, math.ceil(len(group.lines) / (hosts * SHARDS_PER_HOST)))
        for start in range(0, len(group.lines), size):
            cut.append(Shard(group.engine, group.lines[start : start + size], group.concurrency))
    return cut


class RayJob:
    """The driver's side of one job: hosts, the queue of shards, the output, the usage
    ledger (None: not metered) and the progress display."""

    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        log: ResultLog,
        stream: TextIO,
        ledger: Ledger | None = None,
        progress: Progress | None = None,
    ):
        self._settings, self._registry, self._log, self._stream = settings, registry, log, stream
        self._ledger = ledger
        self._progress = progress or Progress(stream)
        self._queue: collections.deque[Shard] = collections.deque()
        self._accepting: set[str] = set()  # custom_ids whose records are being committed
        self._left: dict[str, int] = {}  # each model's lines without a result yet
        self._shown: set[str] = set()  # the models the progress display has started
        self.ok = self.failed = self.tokens = 0

    async def accept(self, results: Sequence[LineResult]) -> list[LineResult]:
        """Append the results the output does not hold yet, their usage records committed
        first (as the local job commits a line's record before its output line); those
        appended. A result the output holds already (a shard run again after its host was
        lost may repeat one that arrived before) is dropped with its record: each output
        line has one record."""
        ran, accepting = self._log.answered.ran, self._accepting
        fresh = [result for result in results if result.custom_id not in ran and result.custom_id not in accepting]
        self._accepting.update(result.custom_id for result in fresh)
        records = [result.usage for result in fresh if result.usage is not None]
        if self._ledger is not None and records:
            await _commit(self._ledger, records)
        for result in fresh:
            self._log.write(result.record)
            self._accepting.discard(result.custom_id)
            self.ok += result.ok
            self.failed += not result.ok
            self.tokens += result.completion_tokens
        return fresh

    def _progressed(self, model: str, accepted: Sequence[LineResult]) -> None:
        for result in accepted:
            self._progress.line_done(result.ok, result.completion_tokens, model)
        self._left[model] -= len(accepted)
        if accepted and not self._left[model]:
            self._progress.model_finished(model)

    def _show(self, shard: Shard) -> str:
        """The name the progress display shows ``shard``'s model by, started with its
        first shard (so the display holds the models running now)."""
        model = shard.engine or NO_MODEL
        if model not in self._shown:
            self._shown.add(model)
            self._progress.model_started(model, self._left[model])
        return model

    def _say(self, text: str) -> None:
        self._stream.write(text + "\n")
        self._stream.flush()

    def _take(self, last: str | None) -> Shard | None:
        """The next shard of the model ``last``, else the next one."""
        for shard in self._queue:
            if shard.engine == last and last is not None:
                self._queue.remove(shard)
                return shard
        return self._queue.popleft() if self._queue else None

    async def _serve(self, name: str, actor: Any) -> None:
        """Run shards on one host until none are left or the host is lost."""
        last: str | None = None
        while (shard := self._take(last)) is not None:
            logger.info("host %s: %d lines of %s", name, len(shard.lines), shard.engine or NO_MODEL)
            model = self._show(shard)
            try:
                # The host may be on another machine: the lines go with their bytes.
                lines = [line.carried() for line in shard.lines]
                refs = actor.run.options(num_returns="streaming").remote(lines, shard.concurrency)
                async for ref in refs:
                    self._progressed(model, await self.accept(await ref))
            except RayActorError:
                rest = [line for line in shard.lines if line.custom_id not in self._log.answered.ran]
                if rest:
                    self._queue.appendleft(Shard(shard.engine, rest, shard.concurrency))
                self._say(f"v4serve batch: host {name} lost; {len(rest)} unfinished line(s) go to other hosts")
                return
            last = shard.engine

    async def _start_host(self, placement: Placement) -> tuple[str, Any] | None:
        actor: Any = ray.remote(BatchHost).options(**actor_options(self._settings, placement))
        handle: Any = actor.remote(self._settings, self._registry, self._ledger is not None)
        try:
            pid = await asyncio.wait_for(asyncio.wrap_future(handle.start.remote().future()), HOST_START_SECONDS)
        except (RayActorError, RayTaskError, TimeoutError) as exc:
            self._say(f"v4serve batch: host {placement.name} did not start ({type(exc).__name__}); going on without it")
            ray.kill(handle, no_restart=True)
            return None
        self._say(f"v4serve batch: host {placement.name} ready (pid {pid})")
        return placement.name, handle

    async def run(self, items: Sequence[BatchLine | LineFault]) -> JobSummary:
        started = time.monotonic()
        todo = [item for item in items if not self._log.answered.holds(item)]
        for item in todo:
            if isinstance(item, LineFault):
                self._log.write(fault_record(item))
                self.failed += 1
        lines = [item for item in todo if isinstance(item, BatchLine)]
        if lines:
            await self._run_lines(lines)
        return JobSummary(self.ok, self.failed, len(items) - len(todo), self.tokens, time.monotonic() - started)

    async def _run_lines(self, lines: list[BatchLine]) -> None:
        wanted = placements(self._settings)
        if not wanted:
            raise NoHostsError("the Ray cluster has no node with the GPUs a host takes (--ray-replica-gpus)")
        hosts = [host for host in await asyncio.gather(*map(self._start_host, wanted)) if host is not None]
        if not hosts:
            raise NoHostsError("no engine host could start on the Ray cluster")
        self._queue.extend(shards(lines, self._settings, self._registry, len(hosts)))
        for shard in self._queue:
            model = shard.engine or NO_MODEL
            self._left[model] = self._left.get(model, 0) + len(shard.lines)
        try:
            await asyncio.gather(*(self._serve(name, actor) for name, actor in hosts))
            if self._queue:
                raise NoHostsError(f"every engine host was lost; {sum(len(s.lines) for s in self._queue)} lines left")
        finally:
            await asyncio.gather(*(_stop(actor) for _, actor in hosts))


async def _commit(ledger: Ledger, records: Sequence[UsageRecord]) -> None:
    """Write ``records`` (one commit: the ledger's writer takes what has gathered) and wait
    until they are committed, at most ``LEDGER_WAIT_SECONDS``, as ``Telemetry.end`` waits
    for an HTTP request's: a stuck or failing ledger is logged, and the job goes on."""
    written = asyncio.gather(*(asyncio.wrap_future(ledger.write(record)) for record in records))
    try:
        # Shielded: a cancelled wait must not cancel a write the ledger's thread will finish.
        await asyncio.wait_for(asyncio.shield(written), LEDGER_WAIT_SECONDS)
    except TimeoutError:
        logger.error(
            "usage ledger: %d record(s) not committed after %.0f s; going on", len(records), LEDGER_WAIT_SECONDS
        )
    except Exception:
        logger.error("usage ledger: %d record(s) were not written (see the error above)", len(records))


async def _stop(actor: Any) -> None:
    """Shut a host's engines down, then end it (a lost host is already gone)."""
    with contextlib.suppress(RayActorError, RayTaskError, TimeoutError):
        await asyncio.wait_for(asyncio.wrap_future(actor.shutdown.remote().future()), 60)
    ray.kill(actor, no_restart=True)


async def run_on_ray(
    settings: Settings,
    registry: Registry,
    items: Sequence[BatchLine | LineFault],
    log: ResultLog,
    stream: TextIO,
    ledger: Ledger | None = None,
) -> JobSummary:
    """Run the job's unanswered lines on the Ray cluster at ``settings.ray_address``,
    recording each answered line in ``ledger`` (None: not recorded)."""
    assert settings.ray_address is not None, "--ray names the cluster"
    try:
        connect(settings.ray_address)
    except ConnectionError as exc:
        stream.write(f"v4serve batch: {exc}\n")
        raise asyncio.CancelledError from exc
    # SIGTERM stops the job as Ctrl-C does: lines in flight are dropped, hosts shut down.
    main = asyncio.current_task()
    assert main is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main.cancel)
    try:
        return await RayJob(settings, registry, log, stream, ledger).run(items)
    except NoHostsError as exc:
        # Stopped before the end, as by Ctrl-C: ``run_batch`` says so and exits 1; the
        # output holds what finished, and the same command resumes from there.
        stream.write(f"v4serve batch: {exc}\n")
        raise asyncio.CancelledError from exc
