"""What a running job shows: a live line of the models running on a terminal, log lines elsewhere.

Per model: lines done/total, failures, output tokens/s and ETA, both measured from the
model's first answer, after its load. The local job runs one model at a time; a job on
Ray (``server.batch.ray_job``) runs several at once, one per host, and names the model
each event is about (``model=``; without it, the model started last). On a terminal the
running models share one line, redrawn in place at most ``REDRAW_SECONDS`` apart, and a
model's line is left as a finished line when it is done. When the output is not a
terminal (a log file, CI), a plain log line is written per model start and end and every
``LOG_SECONDS`` between. ``summary`` is the job's one line at the end.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TextIO

logger = logging.getLogger("server.batch")

REDRAW_SECONDS = 0.2
LOG_SECONDS = 10.0


class JobObserver(Protocol):
    def model_started(self, model: str, total: int) -> None: ...

    def line_done(self, ok: bool, completion_tokens: int) -> None: ...

    def model_finished(self) -> None: ...


@dataclass
class _ModelProgress:
    model: str
    total: int
    done: int = 0
    failed: int = 0
    tokens: int = 0
    # When the first line ended, and its tokens: the rate and ETA are measured from there,
    # so the engine's load (before the first answer) does not count as slow generation.
    first_at: float | None = None
    first_tokens: int = 0


class Progress:
    """A ``JobObserver`` writing to ``stream`` (a live line when it is a terminal)."""

    def __init__(self, stream: TextIO, *, tty: bool | None = None, clock: Callable[[], float] = time.monotonic):
        self._stream = stream
        self._tty = stream.isatty() if tty is None else tty
        self._clock = clock
        self._running: dict[str, _ModelProgress] = {}  # in the order they started
        self._shown = 0.0

    def model_started(self, model: str, total: int) -> None:
        self._running[model] = _ModelProgress(model, total)
        self._shown = self._clock()
        if self._tty:
            self._draw()
        else:
            logger.info("batch: %s: %d lines to run", model, total)

    def line_done(self, ok: bool, completion_tokens: int, model: str | None = None) -> None:
        current = self._find(model)
        if current is None:
            return
        now = self._clock()
        current.done += 1
        current.failed += not ok
        current.tokens += completion_tokens
        if current.first_at is None:
            current.first_at, current.first_tokens = now, current.tokens
        if now - self._shown >= (REDRAW_SECONDS if self._tty else LOG_SECONDS):
            self._shown = now
            if self._tty:
                self._draw()
            else:
                for running in self._running.values():
                    logger.info("batch: %s", self._status(running))

    def model_finished(self, model: str | None = None) -> None:
        current = self._find(model)
        if current is None:
            return
        del self._running[current.model]
        if self._tty:
            self._stream.write("\r\x1b[K" + self._status(current) + "\n")
            if self._running:
                self._draw()
            else:
                self._stream.flush()
        else:
            logger.info("batch: %s (done)", self._status(current))

    def _find(self, model: str | None) -> _ModelProgress | None:
        """``model``'s progress, or the model started last's when None."""
        if model is None:
            return next(reversed(self._running.values()), None)
        return self._running.get(model)

    def _draw(self) -> None:
        self._stream.write("\r\x1b[K" + " | ".join(map(self._status, self._running.values())))
        self._stream.flush()

    def _status(self, current: _ModelProgress) -> str:
        failed = f", {current.failed} failed" if current.failed else ""
        head = f"{current.model}: {current.done}/{current.total} lines{failed}"
        elapsed = self._clock() - current.first_at if current.first_at is not None else 0.0
        if current.done < 2 or elapsed <= 0:
            return f"{head}, - tokens/s, ETA -"
        rate = (current.tokens - current.first_tokens) / elapsed
        left = current.total - current.done
        eta = _clock_text(left * elapsed / (current.done - 1)) if left else "-"
        return f"{head}, {rate:,.0f} tokens/s, ETA {eta}"


def _clock_text(seconds: float) -> str:
    minutes, second = divmod(round(seconds), 60)
    hours, minute = divmod(minutes, 60)
    return f"{hours}:{minute:02d}:{second:02d}"


def summary(ok: int, failed: int, skipped: int, tokens: int, seconds: float) -> str:
    """The job's last line: what ran, how it went, how fast."""
    already = f", {skipped} already in the output" if skipped else ""
    rate = tokens / seconds if seconds > 0 else 0.0
    return (
        f"batch done: {ok} ok, {failed} failed{already}; {tokens:,} output tokens in {_clock_text(seconds)} "
        f"({rate:,.0f} tokens/s)"
    )
