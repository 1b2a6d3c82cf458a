"""One model's place in the pool: its state, its engine, the requests that hold it.

The pool (``server.pool.pool``) decides; a ``Slot`` records, and refuses a transition
the pool never makes (the table in its docstring).
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass

from server.engines.base import Engine
from server.pool.admission import AdmissionGate
from server.pool.eviction import Resident
from server.pool.placement import Placement
from server.registry import RegisteredModel

logger = logging.getLogger(__name__)

# Back-off after a failed load, a failed wake or a dead engine. Failures are counted
# until an engine of the model has served for HEALTHY_SECONDS: the first is retried at
# once (the cause may have been a one-off), then the waits double from
# FIRST_BACKOFF_SECONDS (2, 4, 8 ... s) up to MAX_BACKOFF_SECONDS. A successful load
# alone does not reset the count, so a request that kills its engine every time makes
# reloads ever rarer instead of forcing one each time.
FIRST_BACKOFF_SECONDS = 2.0
MAX_BACKOFF_SECONDS = 60.0
HEALTHY_SECONDS = 60.0

# Numbers slots in the order they were made: a new slot of a model ID waits only for the
# retirement of slots made before it (``EnginePool.replace_registry``).
_SLOT_SERIALS = itertools.count()


class ModelState(str, enum.Enum):
    NOT_LOADED = "not_loaded"
    LOADING = "loading"
    READY = "ready"
    SLEEPING = "sleeping"
    FAILED = "failed"


@dataclass(frozen=True)
class ModelStatus:
    model_id: str
    aliases: tuple[str, ...]
    source: str | None
    base: str | None
    adapter: str | None
    engine: str
    state: ModelState
    running: int
    queued: int
    pinned: bool
    memory: int | None
    devices: str | None
    error: str | None
    load_seconds: float | None
    idle_seconds: float | None


class Slot:
    """Everything the pool knows about one engine-backed model.

    Its fields change only through the methods below; each asserts that its transition
    is one the pool makes:

    ==================== ================================= =================================
    method               from                              to
    ==================== ================================= =================================
    mark_loading         NOT_LOADED, SLEEPING, FAILED,     LOADING (a sleeping engine stays,
                         LOADING (again, under the lock)   to be woken)
    mark_ready           LOADING                           READY, with its engine
    mark_load_deferred   LOADING (no room right now)       SLEEPING with an engine, else
                                                           NOT_LOADED
    mark_sleeping        READY                             SLEEPING, keeping the engine
    mark_failed          LOADING, READY, SLEEPING, FAILED  FAILED, with the back-off
    mark_unloaded        LOADING, READY, SLEEPING, FAILED  NOT_LOADED, or FAILED from
                         (any with an engine)              LOADING or FAILED; no engine
    ==================== ================================= =================================

    ``mark_unloaded`` leaves LOADING when a wake fails, at shutdown, and when an eviction
    that began before a request asked for the model again ends by unloading it (the
    request's load waits for it on the start lock, then starts a fresh engine). An
    engine that stops serving (sleeps, is unloaded or dies) forgives past failures if it
    served for ``HEALTHY_SECONDS``. Where its engine runs (``placement``) is kept beside
    the state: memory is handed back only once an engine has shut down, so an unloaded
    model may still hold its placement for a moment.
    """

    def __init__(self, registered: RegisteredModel, clock: Callable[[], float]):
        entry = registered.entry
        self.registered = registered
        self._clock = clock
        self.state = ModelState.NOT_LOADED
        self.engine: Engine | None = None
        self.placement: Placement | None = None
        self.error: str | None = None
        self.failures = 0  # in a row: reset once an engine has served for HEALTHY_SECONDS
        self.retry_at = 0.0
        self.ready_at: float | None = None  # when the engine last became ready to serve
        self.load_seconds: float | None = None
        self.load_task: asyncio.Task[Engine] | None = None
        self.gate = AdmissionGate(registered.model_id, max_running=entry.max_running, max_queued=entry.max_queued)
        self.holders = 0  # requests holding or waiting for this engine
        self.last_used = clock()
        self.serial = next(_SLOT_SERIALS)
        self._idle = asyncio.Event()  # set while no request holds the engine
        self._idle.set()

    @property
    def model_id(self) -> str:
        return self.registered.model_id

    def resident(self) -> Resident:
        """What eviction decides by (``server.pool.eviction``)."""
        return Resident(
            model_id=self.model_id,
            ready=self.state is ModelState.READY,
            pinned=self.registered.entry.pinned,
            holders=self.holders,
            last_used=self.last_used,
        )

    @property
    def evictable(self) -> bool:
        return self.resident().evictable

    # ----- requests holding the engine -------------------------------------------------

    def hold(self) -> None:
        """A request holds (or waits for) the engine: it is not evicted meanwhile."""
        self.holders += 1
        self._idle.clear()

    def let_go(self) -> None:
        """A request holds the engine no more; the model counts as used now."""
        assert self.holders > 0, f"model {self.model_id}: let go more often than held"
        self.holders -= 1
        self.last_used = self._clock()
        if self.holders == 0:
            self._idle.set()

    async def drained(self) -> None:
        """Until no request holds or waits for the engine."""
        await self._idle.wait()

    def update(self, registered: RegisteredModel) -> None:
        """Take a changed entry that the running engine serves through (``live.SERVING_KEYS``)."""
        self.registered = registered
        self.gate.resize(max_running=registered.entry.max_running, max_queued=registered.entry.max_queued)

    # ----- where the engine runs -------------------------------------------------------

    def set_placement(self, placement: Placement) -> None:
        self.placement = placement

    def clear_placement(self) -> None:
        self.placement = None

    # ----- state transitions (see the class docstring) ---------------------------------

    def _expect(self, transition: str, *allowed: ModelState) -> None:
        assert self.state in allowed, f"model {self.model_id}: {transition} from {self.state.value}"

    def mark_loading(self) -> None:
        self._expect("mark_loading", ModelState.NOT_LOADED, ModelState.SLEEPING, ModelState.FAILED, ModelState.LOADING)
        self.state = ModelState.LOADING

    def mark_ready(self, engine: Engine, *, loading_since: float) -> None:
        """``engine`` serves, loaded (or woken) since ``loading_since``; past errors are cleared."""
        self._expect("mark_ready", ModelState.LOADING)
        assert self.engine is None or self.engine is engine, f"model {self.model_id}: ready with another engine"
        self.engine, self.state, self.error = engine, ModelState.READY, None
        self.ready_at = self.last_used = self._clock()
        self.load_seconds = self.ready_at - loading_since

    def mark_load_deferred(self) -> None:
        """A load found no room now: back to asleep (an engine is there) or not loaded.

        Not a failure of the model: nothing to back off from.
        """
        self._expect("mark_load_deferred", ModelState.LOADING)
        self.state = ModelState.SLEEPING if self.engine is not None else ModelState.NOT_LOADED

    def mark_sleeping(self) -> None:
        """The engine is being put to sleep; it stays, to be woken."""
        self._expect("mark_sleeping", ModelState.READY)
        assert self.engine is not None, f"model {self.model_id}: asleep without an engine"
        self._end_service()
        self.state = ModelState.SLEEPING

    def mark_failed(self, error: str) -> None:
        """Failed with the public ``error``; the back-off grows with failures in a row."""
        self._expect("mark_failed", ModelState.LOADING, ModelState.READY, ModelState.SLEEPING, ModelState.FAILED)
        self._end_service()
        self.failures += 1
        backoff = _backoff(self.failures)
        self.state, self.error, self.retry_at = ModelState.FAILED, error, self._clock() + backoff
        logger.error(
            "model %s %s (failure %d in a row; next try in %.0f s)", self.model_id, error, self.failures, backoff
        )

    def mark_unloaded(self, *, failed: bool = False) -> Engine:
        """The engine leaves the slot, to be shut down by the caller: NOT_LOADED, or
        FAILED (``failed``) for an engine that died or failed to wake. Its placement
        stays until the caller has shut it down (``clear_placement``)."""
        if failed:
            self._expect("mark_unloaded(failed=True)", ModelState.LOADING, ModelState.FAILED)
        else:
            self._expect("mark_unloaded", ModelState.LOADING, ModelState.READY, ModelState.SLEEPING, ModelState.FAILED)
        engine = self.engine
        assert engine is not None, f"model {self.model_id}: unloaded without an engine"
        self._end_service()
        self.engine, self.state = None, ModelState.FAILED if failed else ModelState.NOT_LOADED
        return engine

    def _end_service(self) -> None:
        """The engine stops serving: if it served long enough, past failures are forgiven."""
        if self.ready_at is not None and self._clock() - self.ready_at >= HEALTHY_SECONDS:
            self.failures = 0
        self.ready_at = None


def _backoff(failures: int) -> float:
    """Seconds to wait before retrying after ``failures`` in a row (see FIRST_BACKOFF_SECONDS)."""
    if failures <= 1:
        return 0.0
    return min(MAX_BACKOFF_SECONDS, FIRST_BACKOFF_SECONDS * 2.0 ** (failures - 2))
