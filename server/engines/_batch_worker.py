"""The thread that runs a model, one batched step at a time.

Model calls block for milliseconds to seconds, so they run on one worker thread and
never on the event loop. The thread runs a continuous-batching loop: requests that
arrive while a step runs are prefilled (their prompts run through the model) before the
next step and decode with the others from then on; finished and aborted ones leave
between steps. What a batch holds depends on the model's kind (``_seq2seq_batch``,
``_causal_batch``); the loop only needs the ``Batch`` operations. Results go back to each
request's event loop with ``call_soon_threadsafe``, one call per step.

A model call that raises fails only the request that caused it. A prefill of several
new requests that raises is retried for each alone; a decoding step that raises leaves
the batch's caches in no known state, so every sequence in it is rebuilt alone from its
prompt and the tokens it already has (a prefill that yields the same next-token logits
as the step would have), and those that fail alone are the ones at fault. A failure
that no single request causes (the model broke for everyone) fails each of them, one
after another.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from server.engines._detokenizer import IncrementalDetokenizer
from server.engines._sampling import next_tokens
from server.engines._stop_sequences import StopSequenceFilter
from server.engines.base import GenerationDelta, SamplingOptions
from server.errors import EngineError, ServingError, UnavailableError

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self from Python 3.11

logger = logging.getLogger(__name__)

Outcome = GenerationDelta | ServingError


class Batch(Protocol):
    """Sequences decoded together, one row each, in the order they joined."""

    def step(self, tokens: Sequence[int]) -> torch.Tensor:
        """Feed each row its newest token; returns the logits for the token after it."""

    def extend(self, other: Self) -> None:
        """Append ``other``'s rows (a batch of the same kind) after this batch's."""

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only ``rows``."""


class Prefill(Protocol):
    def __call__(self, prompts: list[list[int]], *, decoded: list[list[int]]) -> tuple[Batch, torch.Tensor]:
        """Run sequences' prompts, each followed by the tokens it already ``decoded`` (none
        for a new sequence); returns their batch and the logits of each one's next token."""


@dataclass(eq=False)
class Job:
    """One request's generation: its inputs, its progress and where its results go."""

    prompt_ids: list[int]
    sampling: SamplingOptions
    detokenizer: IncrementalDetokenizer
    loop: asyncio.AbstractEventLoop
    outbox: asyncio.Queue[Outcome] = field(default_factory=asyncio.Queue)
    tokens: list[int] = field(default_factory=list)
    # Set from the event loop; the worker drops the job before its next step.
    cancelled: bool = False
    # Set by the worker once the job has sent its last outcome.
    done: bool = False
    stops: StopSequenceFilter = field(init=False)
    # The job's own random generator when its request has a seed, made on the model's device.
    generator: torch.Generator | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.stops = StopSequenceFilter(self.sampling.stop)

    def random_generator(self, device: torch.device) -> torch.Generator | None:
        if self.sampling.seed is not None and self.generator is None:
            self.generator = torch.Generator(device=device).manual_seed(self.sampling.seed)
        return self.generator

    def advance(self, token: int, eos_token_ids: Collection[int]) -> GenerationDelta | None:
        """Take the next token; returns the delta to send, None while there is nothing to send.

        Finish reasons follow vLLM's order: EOS or a stop sequence is "stop" even on the
        last allowed token; reaching max_tokens otherwise is "length".
        """
        self.tokens.append(token)
        is_eos = token in eos_token_ids and not self.sampling.ignore_eos
        ended = is_eos or len(self.tokens) >= self.sampling.max_tokens
        text = "" if is_eos else self.detokenizer.push(token)
        if ended:
            text += self.detokenizer.flush()
        text, matched = self.stops.push(text)
        finish = "stop" if matched or is_eos else "length" if ended else None
        if finish is not None and not matched:
            text += self.stops.flush()
        if not text and finish is None:
            return None
        return self._delta(text, finish)

    def aborted(self) -> GenerationDelta:
        return self._delta("", "abort")

    def _delta(self, text: str, finish: str | None) -> GenerationDelta:
        return GenerationDelta(
            text=text,
            prompt_tokens=len(self.prompt_ids),
            completion_tokens=len(self.tokens),
            finish_reason=finish,
        )


# Told after each model step, on the worker's thread: (sequences in the step, jobs waiting).
StepListener = Callable[[int, int], None]


class BatchWorker:
    def __init__(
        self,
        prefill: Prefill,
        *,
        name: str,
        max_batch_size: int,
        eos_token_ids: Collection[int],
        on_step: StepListener | None = None,
    ):
        self._prefill = prefill
        self._on_step = on_step
        self._name = name
        self._max_batch_size = max_batch_size
        self._eos_token_ids = frozenset(eos_token_ids)
        self._wakeup = threading.Condition()
        self._inbox: collections.deque[Job] = collections.deque()
        self._closing = False
        self._running = 0
        self._batch: Batch | None = None
        self._rows: list[Job] = []  # the job of each batch row, in row order
        self.peak_batch_size = 0
        self._thread = threading.Thread(target=self._run, name=f"engine-{name}", daemon=True)
        self._thread.start()

    @property
    def running(self) -> int:
        """Jobs submitted and not yet finished: waiting to join the batch, or in it."""
        return self._running

    @property
    def alive(self) -> bool:
        """False once the thread has stopped: nothing submitted would ever be served."""
        return self._thread.is_alive()

    def submit(self, job: Job) -> None:
        with self._wakeup:
            if self._closing:
                raise UnavailableError(f"model '{self._name}' is shutting down")
            self._running += 1
            self._inbox.append(job)
            self._wakeup.notify()

    def cancel(self, job: Job) -> None:
        job.cancelled = True

    def close(self) -> None:
        """Stop after the current step; jobs still waiting or running are told so."""
        with self._wakeup:
            self._closing = True
            self._wakeup.notify()
        self._thread.join()

    def _run(self) -> None:
        with torch.inference_mode():
            while (arrivals := self._next_arrivals()) is not None:
                try:
                    self._admit(arrivals)
                    self._decode()
                except Exception as exc:
                    # Model calls fail one request at a time (``_join``, ``_decode``): this is
                    # the loop's own bookkeeping, which leaves no batch to go on with.
                    logger.exception("the batch of model %s failed", self._name)
                    self._abandon([*arrivals, *self._rows], self._failure(exc))
        with self._wakeup:
            leftover = [*self._inbox, *self._rows]
            self._inbox.clear()
        self._abandon(leftover, UnavailableError(f"model '{self._name}' is shutting down"))

    def _next_arrivals(self) -> list[Job] | None:
        """Jobs to admit before the next step (waiting while there is no work); None to stop."""
        with self._wakeup:
            while not (self._closing or self._inbox or self._rows):
                self._wakeup.wait()
            if self._closing:
                return None
            room = self._max_batch_size - len(self._rows)
            return [self._inbox.popleft() for _ in range(min(room, len(self._inbox)))]

    def _admit(self, arrivals: list[Job]) -> None:
        jobs = [arrivals[row] for row in self._drop_cancelled(arrivals)]
        if jobs:
            self._join(jobs)

    def _join(self, jobs: list[Job]) -> None:
        """Prefill ``jobs`` (prompts and tokens so far), take their next tokens, and add the
        ones still going to the batch; when that raises, each is tried alone."""
        try:
            batch, logits = self._prefill([job.prompt_ids for job in jobs], decoded=[job.tokens for job in jobs])
            tokens = self._next_tokens(jobs, logits)
        except Exception as exc:
            if len(jobs) == 1:
                self._fail(jobs[0], exc)
                return
            logger.warning(
                "prefilling %d sequences of model %s failed; trying each alone", len(jobs), self._name, exc_info=exc
            )
            for job in jobs:
                self._join([job])
            return
        self._note_batch_size(len(jobs))
        staying = self._advance(jobs, tokens)
        if not staying:
            return
        if len(staying) < len(jobs):
            batch.keep(staying)
        if self._batch is None:
            self._batch = batch
        else:
            self._batch.extend(batch)
        self._rows += [jobs[row] for row in staying]

    def _decode(self) -> None:
        self._keep_rows(self._drop_cancelled(self._rows))
        if self._batch is None:
            return
        rows = self._rows
        try:
            logits = self._batch.step([job.tokens[-1] for job in rows])
            tokens = self._next_tokens(rows, logits)
        except Exception:
            logger.exception(
                "a step of model %s failed; rebuilding each of its %d sequences alone", self._name, len(rows)
            )
            self._batch, self._rows = None, []
            for job in rows:
                self._join([job])
            return
        self._note_batch_size(len(rows))
        self._keep_rows(self._advance(rows, tokens))

    def _keep_rows(self, rows: Sequence[int]) -> None:
        if len(rows) == len(self._rows):
            return
        self._rows = [self._rows[row] for row in rows]
        if not rows:
            self._batch = None
        elif self._batch is not None:
            self._batch.keep(rows)

    @staticmethod
    def _next_tokens(jobs: Sequence[Job], logits: torch.Tensor) -> list[int]:
        return next_tokens(
            logits,
            [job.sampling for job in jobs],
            [job.tokens for job in jobs],
            [job.random_generator(logits.device) for job in jobs],
        )

    def _advance(self, jobs: Sequence[Job], tokens: Sequence[int]) -> list[int]:
        """Give each job its next token and send what it produced; returns the rows still going."""
        outcomes: list[tuple[Job, Outcome]] = []
        staying = []
        for row, (job, token) in enumerate(zip(jobs, tokens, strict=True)):
            delta = job.advance(token, self._eos_token_ids)
            if delta is not None:
                outcomes.append((job, delta))
            if delta is not None and delta.finish_reason is not None:
                self._retire(job)
            else:
                staying.append(row)
        _send(outcomes)
        return staying

    def _drop_cancelled(self, jobs: Sequence[Job]) -> list[int]:
        """Retire cancelled jobs, each with an "abort" delta; returns the rows still wanted."""
        # One reading of the flags: the event loop may set more while this runs.
        cancelled = [job.cancelled for job in jobs]
        dropped = [job for job, flag in zip(jobs, cancelled, strict=True) if flag]
        for job in dropped:
            self._retire(job)
        _send([(job, job.aborted()) for job in dropped])
        return [row for row, flag in enumerate(cancelled) if not flag]

    def _fail(self, job: Job, exc: Exception) -> None:
        """Fail the one job a model call raised for, alone."""
        logger.error("model %s failed a request", self._name, exc_info=exc)
        self._retire(job)
        _send([(job, self._failure(exc))])

    def _failure(self, exc: Exception) -> EngineError:
        # The exception's own text stays in the log: it can name internals.
        return EngineError(
            f"the engine serving model '{self._name}' failed on this request "
            f"({type(exc).__name__}); the server log has the details"
        )

    def _abandon(self, jobs: Sequence[Job], error: ServingError) -> None:
        unfinished = [job for job in jobs if not job.done]
        for job in unfinished:
            self._retire(job)
        self._batch, self._rows = None, []
        _send([(job, error) for job in unfinished])

    def _retire(self, job: Job) -> None:
        if job.done:
            return
        job.done = True
        with self._wakeup:
            self._running -= 1

    def _note_batch_size(self, size: int) -> None:
        if self._on_step is not None:
            self._on_step(size, len(self._inbox))
        if size > self.peak_batch_size:
            self.peak_batch_size = size
            if size > 1:
                logger.info("model %s: %d sequences in one step (a new peak)", self._name, size)


def _send(outcomes: Sequence[tuple[Job, Outcome]]) -> None:
    """Hand outcomes to their jobs' event loops, one callback per loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Job, Outcome]]] = {}
    for job, outcome in outcomes:
        by_loop.setdefault(job.loop, []).append((job, outcome))
    for loop, items in by_loop.items():
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits for these any more
            loop.call_soon_threadsafe(_deliver, items)


def _deliver(items: Sequence[tuple[Job, Outcome]]) -> None:
    for job, outcome in items:
        job.outbox.put_nowait(outcome)
