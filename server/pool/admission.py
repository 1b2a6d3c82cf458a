"""Per-model limits on running and queued requests.

An engine batches whatever it is given, so without a bound a burst turns into an
ever-growing queue and every caller times out. Each model admits at most
``max_running`` requests into its engine and lets at most ``max_queued`` more wait their
turn in arrival order; past both, the caller is told to come back later (429 with
``Retry-After``) while it still can do something useful about it.
"""

from __future__ import annotations

import asyncio
import collections
import math
import time

from server.errors import OverloadedError


class AdmissionGate:
    def __init__(self, model_id: str, *, max_running: int, max_queued: int):
        self.model_id = model_id
        self.max_running = max_running
        self.max_queued = max_queued
        self.running = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        # Smoothed request duration, for an honest Retry-After.
        self._mean_seconds = 1.0

    @property
    def queued(self) -> int:
        return len(self._waiters)

    async def enter(self) -> float:
        """Wait for a running slot; the start time, to pass back to ``leave``."""
        if self.running < self.max_running and not self._waiters:
            self.running += 1
            return time.monotonic()
        if len(self._waiters) >= self.max_queued:
            raise OverloadedError(
                f"model '{self.model_id}' is at its limit of {self.max_running} running and "
                f"{self.max_queued} queued requests; retry later",
                retry_after=self._retry_after(),
            )
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release_slot()  # the slot was handed over just as we gave up
            else:
                self._waiters.remove(waiter)
            raise
        return time.monotonic()

    def leave(self, started: float) -> None:
        elapsed = time.monotonic() - started
        self._mean_seconds = 0.8 * self._mean_seconds + 0.2 * elapsed
        self._release_slot()

    def resize(self, *, max_running: int, max_queued: int) -> None:
        """New limits (the registry entry changed). Waiters a higher running limit makes
        room for are let in now; requests already queued stay queued under a lower limit."""
        self.max_running, self.max_queued = max_running, max_queued
        while self._waiters and self.running < self.max_running:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.running += 1
                waiter.set_result(None)

    def _release_slot(self) -> None:
        # Hand the slot straight to the oldest waiter, so a newcomer cannot overtake it.
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.running -= 1

    def _retry_after(self) -> float:
        # Roughly how long until the queue ahead drains at the current pace.
        rounds = (self.queued + 1) / max(1, self.max_running)
        return max(1.0, math.ceil(rounds * self._mean_seconds))
