"""Which engine serves a model: loading on demand, memory budget, eviction, failures.

The pool is the only owner of engines. A request takes a ``Lease`` on a model by ID or
alias; the pool starts the model's engine on first use (or at start-up when preloaded or
pinned), and every concurrent request for a model that is loading waits on that one load
instead of starting a second. Engines start one after another because vLLM sizes its
memory from what is free at start-up, and two engines profiling at once mis-size each
other.

Memory is budgeted per device. A model that does not fit beside the loaded ones first
unloads (or, with sleep mode on GPUs, puts to sleep) the least recently used model that
is neither pinned nor serving a request; a model unused for longer than its keep-alive
is unloaded by itself. An engine that dies is noticed, its requests fail with 503, and
it is restarted by the next request, with a growing back-off if it keeps failing.

A LoRA adapter entry has no engine of its own: its base's engine is started with every
adapter registered on that base, so one engine serves the base and all its fine-tunes.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import gc
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from server.engines.base import AdapterRef, Engine, LaunchOptions
from server.errors import ModelNotFoundError, UnavailableError
from server.pool.admission import AdmissionGate
from server.pool.memory import memory_need
from server.pool.placement import Device, DevicePlanner, Placement
from server.registry import ModelEntry, RegisteredModel, Registry
from server.weights import lora_rank, resolve_source

logger = logging.getLogger(__name__)

# (model ID, entry, weights, LoRA adapters on the model, launch options) -> a ready engine.
EngineStarter = Callable[[str, ModelEntry, str, Sequence[AdapterRef], LaunchOptions], Awaitable[Engine]]

# Back-off after a failed load or a dead engine: the first retry is immediate (the
# cause may have been a one-off), then the waits double up to the cap.
FIRST_BACKOFF_SECONDS = 2.0
MAX_BACKOFF_SECONDS = 60.0
# How often idle models are checked against their keep-alive and engines for liveness.
WATCH_INTERVAL_SECONDS = 1.0


def _start_vllm(
    model_id: str, entry: ModelEntry, weights: str, adapters: Sequence[AdapterRef], launch: LaunchOptions
) -> Awaitable[Engine]:
    from server.engines.vllm_engine import VLLMEngine

    return VLLMEngine.start(model_id, entry, weights, adapters, launch)


def _start_transformers(
    model_id: str, entry: ModelEntry, weights: str, adapters: Sequence[AdapterRef], launch: LaunchOptions
) -> Awaitable[Engine]:
    from server.engines.transformers_engine import TransformersEngine

    return TransformersEngine.start(model_id, entry, weights, adapters, launch)


ENGINE_STARTERS: dict[str, EngineStarter] = {"vllm": _start_vllm, "transformers": _start_transformers}


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


class _Slot:
    """Everything the pool knows about one engine-backed model."""

    def __init__(self, registered: RegisteredModel):
        entry = registered.entry
        self.registered = registered
        self.state = ModelState.NOT_LOADED
        self.engine: Engine | None = None
        self.placement: Placement | None = None
        self.error: str | None = None
        self.failures = 0
        self.retry_at = 0.0
        self.load_seconds: float | None = None
        self.load_task: asyncio.Task[Engine] | None = None
        self.gate = AdmissionGate(registered.model_id, max_running=entry.max_running, max_queued=entry.max_queued)
        self.holders = 0  # requests holding or waiting for this engine
        self.last_used = time.monotonic()

    @property
    def model_id(self) -> str:
        return self.registered.model_id

    @property
    def evictable(self) -> bool:
        return self.state is ModelState.READY and self.holders == 0 and not self.registered.entry.pinned


class Lease:
    """One request's hold on an engine: an admission slot, and protection from eviction.

    ``release`` must be called exactly once when the request ends, however it ends.
    """

    def __init__(self, pool: EnginePool, slot: _Slot, engine: Engine, started: float):
        self.engine = engine
        self._pool, self._slot, self._started = pool, slot, started
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._pool._release(self._slot, self._started)


class EnginePool:
    def __init__(
        self,
        registry: Registry,
        *,
        home: Path,
        devices: list[Device] | None = None,
        load_timeout: float = 900.0,
        keep_alive: float | None = None,
        sleep_mode: bool = False,
        starters: dict[str, EngineStarter] | None = None,
    ):
        self._registry = registry
        self._home = home
        self._planner = DevicePlanner(devices) if devices else None
        self._load_timeout = load_timeout
        self._keep_alive = keep_alive
        self._sleep_mode = sleep_mode
        self._starters = starters or ENGINE_STARTERS
        # Adapters get no slot: they are served by their base's engine.
        self._slots = {m.model_id: _Slot(m) for m in registry if not m.entry.is_adapter}
        self._adapters: dict[str, list[RegisteredModel]] = {}
        for m in registry:
            if m.entry.base is not None:
                self._adapters.setdefault(m.entry.base, []).append(m)
        # Adapters left out of their base's engine, and why.
        self._adapter_errors: dict[str, str] = {}
        self._start_lock = asyncio.Lock()
        self._watcher: asyncio.Task[None] | None = None
        self._closed = False

    # ----- looking models up -------------------------------------------------------

    def lookup(self, name: str) -> RegisteredModel:
        registered = self._registry.resolve(name)
        if registered is None and name in self._registry.hosted_vendor_ids:
            raise ModelNotFoundError(
                f"model '{name}' is a hosted vendor model with no open weights, so this server "
                "cannot run it; to answer its requests with an open model, alias it in an "
                f"operator registry file (aliases: {{{name}: llama-3-1-70b-instruct}}) and start "
                "the server with `v4serve serve --registry FILE`",
                param="model",
            )
        if registered is None:
            raise ModelNotFoundError(
                f"model '{name}' is not in the registry; GET /v4/models lists the models this "
                "server can serve, and an operator can add one with --registry FILE",
                param="model",
            )
        return registered

    def _slot_of(self, registered: RegisteredModel) -> _Slot:
        """The slot of the engine serving ``registered``: an adapter's is its base's."""
        return self._slots[registered.entry.base or registered.model_id]

    # ----- serving requests ----------------------------------------------------------

    async def lease(self, name: str) -> Lease:
        """A hold on the ready engine for ``name``, loading it first if needed.

        Raises 404 for an unknown model, 503 when it cannot be loaded in time, and 429
        when the model is at its running and queued limits.
        """
        registered = self.lookup(name)
        slot = self._slot_of(registered)
        slot.holders += 1
        try:
            engine = await self._ready_engine(slot)
            adapter_error = self._adapter_errors.get(registered.model_id)
            if adapter_error is not None:
                raise UnavailableError(f"LoRA adapter '{registered.model_id}' failed to load: {adapter_error}")
            started = await slot.gate.enter()
        except BaseException:
            slot.holders -= 1
            slot.last_used = time.monotonic()
            raise
        return Lease(self, slot, engine, started)

    def _release(self, slot: _Slot, started: float) -> None:
        slot.gate.leave(started)
        slot.holders -= 1
        slot.last_used = time.monotonic()

    async def _ready_engine(self, slot: _Slot) -> Engine:
        if slot.engine is not None and not slot.engine.alive:
            await self._engine_died(slot)
        if slot.engine is not None and slot.state is ModelState.READY:
            return slot.engine
        if self._closed:
            raise UnavailableError("the server is shutting down", retry_after=30)
        if slot.state is ModelState.FAILED and time.monotonic() < slot.retry_at:
            raise UnavailableError(
                f"model '{slot.model_id}' failed: {slot.error}; retrying after back-off",
                retry_after=slot.retry_at - time.monotonic(),
            )
        if slot.load_task is None:
            slot.load_task = asyncio.create_task(self._load(slot))
        try:
            return await asyncio.wait_for(asyncio.shield(slot.load_task), self._load_timeout)
        except TimeoutError as exc:
            raise UnavailableError(f"model '{slot.model_id}' is still loading", retry_after=10) from exc

    # ----- loading, unloading --------------------------------------------------------

    async def _load(self, slot: _Slot) -> Engine:
        model_id = slot.model_id
        previous_state, slot.state = slot.state, ModelState.LOADING
        started = time.monotonic()
        try:
            async with self._start_lock:
                if previous_state is ModelState.SLEEPING and slot.engine is not None:
                    engine = await self._wake(slot)
                else:
                    engine = await self._start(slot)
        except UnavailableError:
            # Not enough room right now is not a failure of the model: nothing to back off.
            slot.state = previous_state if previous_state is ModelState.SLEEPING else ModelState.NOT_LOADED
            raise
        except Exception as exc:
            self._failed(slot, f"failed to load: {_reason(exc)}")
            raise UnavailableError(
                f"model '{model_id}' {slot.error}", retry_after=max(1.0, slot.retry_at - time.monotonic())
            ) from exc
        finally:
            slot.load_task = None
        slot.engine, slot.state, slot.error, slot.failures = engine, ModelState.READY, None, 0
        slot.load_seconds = time.monotonic() - started
        slot.last_used = time.monotonic()
        logger.info("model %s ready in %.1f s", model_id, slot.load_seconds)
        _freeze_gc_heap()
        return engine

    async def _start(self, slot: _Slot) -> Engine:
        model_id, entry = slot.model_id, slot.registered.entry
        weights = await asyncio.to_thread(resolve_source, entry.source, self._home, revision=entry.revision)
        adapters = await asyncio.to_thread(self._resolve_adapters, model_id)
        launch = LaunchOptions(enable_sleep=self._sleep_mode)
        if self._planner is not None:
            slot.placement = await self._make_room(slot, weights)
            launch = LaunchOptions(
                visible_devices=slot.placement.visible_devices,
                memory_share=slot.placement.memory_share,
                enable_sleep=self._sleep_mode,
            )
        logger.info("loading model %s from %s (%s engine)", model_id, weights, entry.engine)
        if adapters:
            logger.info("model %s serves LoRA adapters %s", model_id, ", ".join(a.name for a in adapters))
        try:
            return await self._starters[entry.engine](model_id, entry, weights, adapters, launch)
        except BaseException:
            self._free_placement(slot)
            raise

    async def _wake(self, slot: _Slot) -> Engine:
        assert slot.engine is not None and slot.placement is not None
        if self._planner is not None:
            await self._make_room(slot, None, on=slot.placement.devices)
        logger.info("waking model %s", slot.model_id)
        await slot.engine.wake_up()
        return slot.engine

    async def _make_room(self, slot: _Slot, weights: str | None, on: tuple[Device, ...] | None = None) -> Placement:
        """Place ``slot`` on devices, unloading least recently used idle models as needed."""
        assert self._planner is not None
        entry = slot.registered.entry
        need = (
            slot.placement.bytes_per_device * len(slot.placement.devices)
            if slot.placement is not None and weights is None
            else memory_need(entry, weights or "", self._planner.devices[0])
        )
        tp = entry.tensor_parallel_size
        if not self._planner.fits_at_all(need, tp):
            raise RuntimeError(
                f"it needs {need / (1 << 30):.1f} GiB on {tp} device(s), more than this server's "
                "memory budget (--memory-budget) offers"
            )
        while (placement := self._planner.place(slot.model_id, need, tp, on=on)) is None:
            victims = sorted((s for s in self._slots.values() if s is not slot and s.evictable), key=lambda s: s.last_used)
            if not victims:
                busy = ", ".join(s.model_id for s in self._slots.values() if s.placement is not None and s is not slot)
                raise UnavailableError(
                    f"model '{slot.model_id}' does not fit beside the models serving requests "
                    f"now ({busy}); retry when they are idle",
                    retry_after=10,
                )
            await self._evict(victims[0], reason=f"to make room for {slot.model_id}")
        return placement

    async def _evict(self, slot: _Slot, *, reason: str) -> None:
        """Free ``slot``'s memory: sleep when the engine can, else unload it."""
        assert slot.engine is not None
        if self._sleep_mode and slot.engine.supports_sleep:
            logger.info("putting model %s to sleep %s", slot.model_id, reason)
            slot.state = ModelState.SLEEPING
            await slot.engine.sleep()
            if self._planner is not None:
                self._planner.release(slot.model_id)  # the devices stay recorded in slot.placement
            return
        logger.info("unloading model %s %s", slot.model_id, reason)
        await self._unload(slot, ModelState.NOT_LOADED)

    async def _unload(self, slot: _Slot, state: ModelState) -> None:
        engine, slot.engine, slot.state = slot.engine, None, state
        self._free_placement(slot)
        if engine is not None:
            with contextlib.suppress(Exception):
                await engine.shutdown()

    def _free_placement(self, slot: _Slot) -> None:
        if self._planner is not None:
            self._planner.release(slot.model_id)
        slot.placement = None

    def _failed(self, slot: _Slot, error: str) -> None:
        slot.failures += 1
        backoff = 0.0 if slot.failures == 1 else min(MAX_BACKOFF_SECONDS, FIRST_BACKOFF_SECONDS * 2 ** (slot.failures - 2))
        slot.state, slot.error, slot.retry_at = ModelState.FAILED, error, time.monotonic() + backoff
        logger.error("model %s %s (failure %d; next try in %.0f s)", slot.model_id, error, slot.failures, backoff)

    async def _engine_died(self, slot: _Slot) -> None:
        self._failed(slot, "failed: its engine process died; it restarts on the next request")
        await self._unload(slot, ModelState.FAILED)

    def _resolve_adapters(self, base_id: str) -> list[AdapterRef]:
        """The adapters on ``base_id``, their weights made present; blocks (may download).

        An adapter that cannot be made present (say, the hub is unreachable) is left out
        rather than failing the load: the base and its other adapters still serve.
        """
        adapters = []
        for registered in self._adapters.get(base_id, []):
            adapter_id, entry = registered.model_id, registered.entry
            try:
                path = resolve_source(entry.adapter, self._home, revision=entry.revision)
                adapters.append(AdapterRef(adapter_id, path, lora_rank(path)))
            except Exception as exc:
                self._adapter_errors[adapter_id] = reason = _reason(exc)
                logger.error("LoRA adapter %s left out of model %s: %s", adapter_id, base_id, reason)
            else:
                self._adapter_errors.pop(adapter_id, None)
        return adapters

    # ----- lifecycle -----------------------------------------------------------------

    def startup_models(self, preload: Iterable[str] = ()) -> tuple[str, ...]:
        """What ``start`` loads: every pinned model, then the preloaded ones."""
        pinned = [m.model_id for m in self._registry if m.entry.pinned and not m.entry.is_adapter]
        return tuple(dict.fromkeys([*pinned, *preload]))

    async def start(self, models: Iterable[str]) -> None:
        """Load ``models`` one by one, and start watching engines.

        A model that fails to load is reported in ``status`` and does not stop the others.
        """
        self._watcher = asyncio.create_task(self._watch())
        for name in models:
            try:
                slot = self._slot_of(self.lookup(name))
                await self._ready_engine(slot)
            except Exception as exc:
                logger.error("preloading %s failed: %s", name, exc)

    async def _watch(self) -> None:
        """Unload models past their keep-alive; notice engines that died while idle."""
        while True:
            await asyncio.sleep(WATCH_INTERVAL_SECONDS)
            now = time.monotonic()
            for slot in list(self._slots.values()):
                if slot.engine is None or slot.load_task is not None:
                    continue
                if not slot.engine.alive:
                    await self._engine_died(slot)
                    continue
                keep_alive = slot.registered.entry.keep_alive or self._keep_alive
                if keep_alive is not None and slot.evictable and now - slot.last_used > keep_alive:
                    await self._evict(slot, reason=f"after {keep_alive:g} s unused (keep-alive)")

    def is_ready(self, names: Iterable[str]) -> bool:
        return all(self._slot_of(self.lookup(n)).state is ModelState.READY for n in names)

    def status(self) -> list[ModelStatus]:
        """Every registered model; an adapter shows the state of its base's engine."""
        now = time.monotonic()
        statuses = []
        for registered in self._registry:
            entry, slot = registered.entry, self._slot_of(registered)
            adapter_error = self._adapter_errors.get(registered.model_id)
            statuses.append(
                ModelStatus(
                    model_id=registered.model_id,
                    aliases=entry.aliases,
                    source=entry.source,
                    base=entry.base,
                    adapter=entry.adapter,
                    engine=slot.registered.entry.engine,
                    state=ModelState.FAILED if adapter_error else slot.state,
                    running=slot.engine.stats().running if slot.engine is not None and slot.engine.alive else 0,
                    queued=slot.gate.queued,
                    pinned=slot.registered.entry.pinned,
                    memory=slot.placement.bytes_per_device * len(slot.placement.devices) if slot.placement else None,
                    devices=slot.placement.visible_devices if slot.placement else None,
                    error=adapter_error or slot.error,
                    load_seconds=slot.load_seconds,
                    idle_seconds=now - slot.last_used if slot.engine is not None and slot.holders == 0 else None,
                )
            )
        return statuses

    async def shutdown(self) -> None:
        """Stop every engine; requests still running get an error from their engine."""
        self._closed = True
        if self._watcher is not None:
            self._watcher.cancel()
        for slot in self._slots.values():
            if slot.load_task is not None:
                slot.load_task.cancel()
            if slot.engine is not None:
                logger.info("shutting down model %s", slot.model_id)
                await self._unload(slot, ModelState.NOT_LOADED)


def _reason(exc: BaseException) -> str:
    """The most specific message in an exception chain: vLLM wraps start-up errors."""
    while exc.__cause__ is not None and not str(exc):
        exc = exc.__cause__
    text = str(exc) or type(exc).__name__
    return text.strip().splitlines()[-1][:500]


def _freeze_gc_heap() -> None:
    """Move everything alive after a load out of the garbage collector's sight.

    An engine load leaves millions of long-lived objects (tokenizer, configs, torch and
    vLLM modules); without this, every full collection walks them all and stalls the
    event loop mid-stream for hundreds of milliseconds. vLLM's own server does the same
    once after start-up; a pool that loads engines later does it after each load.
    """
    gc.collect()
    gc.freeze()
