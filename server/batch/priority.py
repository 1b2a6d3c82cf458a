"""Batch lines run behind interactive requests, on the server's own engines.

Two rules, both applied before a batch line is handed to the service:

- At most ``max_running`` batch lines run at once, over all batches (``--batch-max-running``),
  so batch work never takes every admission slot of a model: interactive requests find
  room without queueing behind a batch.
- A line starts only while no request waits in its model's admission queue (``queued`` of
  ``EnginePool.status``). When interactive load fills a model's running slots, its next
  requests queue at the gate; batch work then stops adding lines, and each slot a
  finishing batch line frees goes to the oldest queued request, so interactive requests
  overtake every batch line not yet started. Batch lines resume once the queue is empty.

The queue is looked at every ``POLL_SECONDS`` while a line waits; the pool has no
notification for it, and a batch line can afford that delay.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from server.errors import ModelNotFoundError
from server.pool import EnginePool

POLL_SECONDS = 0.05


class BatchPriority:
    def __init__(self, pool: EnginePool, max_running: int):
        self._pool = pool
        self._slots = asyncio.Semaphore(max_running)
        # Times a batch line waited for a model's queue to empty: what tests and logs read.
        self.yielded = 0

    @contextlib.asynccontextmanager
    async def admission(self, model: str | None) -> AsyncIterator[None]:
        """Held while one batch line runs (``server.batch.runner.Admission``)."""
        async with self._slots:
            waited = False
            while self._queued(model):
                if not waited:
                    waited = True
                    self.yielded += 1
                await asyncio.sleep(POLL_SECONDS)
            yield

    def _queued(self, model: str | None) -> bool:
        if model is None:
            return False
        try:
            registered = self._pool.lookup(model)
        except ModelNotFoundError:
            return False
        engine = registered.entry.base or registered.model_id
        return any(status.model_id == engine and status.queued > 0 for status in self._pool.status())
