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
it is restarted by the next request, with a growing back-off if it keeps failing (see
``server.pool.slot.HEALTHY_SECONDS``).

Every change to which engines hold memory (start, wake, sleep, unload) happens under one
lock, and memory is handed back only once an engine has finished going to sleep or
shutting down, so a load never counts on memory an engine still holds, and a request
that arrives while its model is being put away waits for that to end, then brings it
back.

What a failure shows to clients (503 messages, ``GET /v4/models``) says what failed and
the exception's type; the whole exception, with the paths of weights and caches, goes to
the server log. Only messages the server writes for clients itself (``_PUBLIC_ERRORS``)
are shown in full, with local paths cut out.

A LoRA adapter entry has no engine of its own: its base's engine is started with every
adapter registered on that base, so one engine serves the base and all its fine-tunes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from server.engines.base import AdapterRef, Engine, LaunchOptions
from server.errors import ModelNotFoundError, UnavailableError
from server.pool.eviction import pick_victim
from server.pool.live import ConflictError, RegistryChanges, adapter_weights_changed, compare, needs_new_engine
from server.pool.memory import memory_need
from server.pool.placement import Device, DevicePlanner, Placement
from server.pool.slot import ModelState, ModelStatus, Slot
from server.pool.starters import EngineStarter, engine_starters
from server.registry import RegisteredModel, Registry
from server.telemetry import Telemetry, phase
from server.weights import lora_rank, resolve_source
from server.weights.hub import HubError

logger = logging.getLogger(__name__)

# How often idle models are checked against their keep-alive and engines for liveness.
WATCH_INTERVAL_SECONDS = 1.0


class OverBudgetError(RuntimeError):
    """A model needs more memory than this server's budget offers, even with all else unloaded."""


# Errors whose messages the server writes for clients: shown in full, less local paths.
_PUBLIC_ERRORS = (HubError, OverBudgetError)
# An absolute or home-relative path, not inside a URL or a hub repo ID ("org/model").
_LOCAL_PATH = re.compile(r"(?<![\w.:/~-])~?/[^\s'\"`()\[\],;]+")


class Lease:
    """One request's hold on an engine: an admission slot, and protection from eviction.

    ``release`` must be called exactly once when the request ends, however it ends.
    """

    def __init__(self, pool: EnginePool, slot: Slot, engine: Engine, started: float):
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
        starters: Mapping[str, EngineStarter] | None = None,
        clock: Callable[[], float] = time.monotonic,
        local_weights: bool = True,
    ):
        self._registry = registry
        # False where engines run on other machines that fetch their own weights (a Ray
        # cluster's ingress, server.cluster): starters then get the registry source as
        # written, and no adapters, instead of weights made present here.
        self._local_weights = local_weights
        # What keep-alive, back-off and health are judged by: tests pass a clock of their own.
        self._clock = clock
        self._home = home
        self._planner = DevicePlanner(devices) if devices else None
        self._load_timeout = load_timeout
        self._keep_alive = keep_alive
        self._sleep_mode = sleep_mode
        # None: the engines of ``engine_starters``, made to report where the pool does.
        self._starters: Mapping[str, EngineStarter] | None = starters
        # Where loads, evictions, queue waits and the pool's state are reported (``report_to``).
        self._telemetry: Telemetry | None = None
        # Adapters get no slot: they are served by their base's engine.
        self._slots = {m.model_id: Slot(m, clock) for m in registry if not m.entry.is_adapter}
        self._adapters: dict[str, list[RegisteredModel]] = {}
        for m in registry:
            if m.entry.base is not None:
                self._adapters.setdefault(m.entry.base, []).append(m)
        # Adapters left out of their base's engine, and why (the public text).
        self._adapter_errors: dict[str, str] = {}
        # Held while engines start, wake, sleep or shut down: see the module docstring.
        self._start_lock = asyncio.Lock()
        self._watcher: asyncio.Task[None] | None = None
        self._closed = False
        # Registry changes apply one at a time (``replace_registry``).
        self._registry_lock = asyncio.Lock()
        # Slots the registry no longer has, each shut down once its requests end.
        self._retiring: dict[Slot, asyncio.Task[None]] = {}
        # Loads a registry change started (a replaced engine, a model pinned).
        self._loads: set[asyncio.Task[None]] = set()

    def report_to(self, telemetry: Telemetry) -> None:
        """Report to ``telemetry``: counters as things happen, gauges on each scrape."""
        self._telemetry = telemetry
        telemetry.metrics.on_scrape(self._report_state)

    def _report_state(self) -> None:
        if self._telemetry is None:
            return
        # Engines retired by a registry change hold their memory until they shut down, and
        # serve what they hold until they drain: their requests count under their model
        # (the state is the current slot's, if any).
        models: dict[str, tuple[str, int, int]] = {}
        draining = [slot for slot in self._retiring if slot.gate.running or slot.gate.queued]
        for slot in [*draining, *self._slots.values()]:
            _, running, queued = models.get(slot.model_id, ("", 0, 0))
            models[slot.model_id] = (slot.state.value, running + slot.gate.running, queued + slot.gate.queued)
        reserved = [
            (_device_name(device), slot.model_id, slot.placement.bytes_per_device)
            for slot in [*self._retiring, *self._slots.values()]
            if slot.placement is not None and slot.state is not ModelState.SLEEPING
            for device in slot.placement.devices
        ]
        self._telemetry.metrics.set_models((model, *row) for model, row in models.items())
        self._telemetry.metrics.set_memory(reserved)

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
                f"model '{name}' is not in the registry; GET /v4/models (or /v1/models) lists the models this "
                "server can serve, and an operator can add one with --registry FILE",
                param="model",
            )
        return registered

    def _slot_of(self, registered: RegisteredModel) -> Slot:
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
        slot.hold()
        try:
            with phase("model load") if slot.state is not ModelState.READY else contextlib.nullcontext():
                engine = await self._ready_engine(slot)
            adapter_error = self._adapter_errors.get(registered.model_id)
            if adapter_error is not None:
                raise UnavailableError(f"LoRA adapter '{registered.model_id}' {adapter_error}")
            with phase("queue wait"):
                asked = time.monotonic()
                started = await slot.gate.enter()
            if self._telemetry is not None:
                self._telemetry.metrics.queue_wait.labels(model=registered.model_id).observe(started - asked)
        except BaseException:
            slot.let_go()
            raise
        return Lease(self, slot, engine, started)

    def _release(self, slot: Slot, started: float) -> None:
        slot.gate.leave(started)
        slot.let_go()

    async def _ready_engine(self, slot: Slot) -> Engine:
        engine = slot.engine
        if engine is not None and slot.load_task is None and not engine.alive:
            await self._engine_died(slot, engine)
        if slot.engine is not None and slot.state is ModelState.READY:
            return slot.engine
        if self._closed:
            raise UnavailableError("the server is shutting down", retry_after=30)
        wait = slot.retry_at - self._clock()
        if slot.state is ModelState.FAILED and wait > 0:
            raise UnavailableError(
                f"model '{slot.model_id}' {slot.error}; it is tried again in {wait:.0f} s", retry_after=wait
            )
        if slot.load_task is None:
            slot.load_task = asyncio.create_task(self._load(slot))
        try:
            return await asyncio.wait_for(asyncio.shield(slot.load_task), self._load_timeout)
        except TimeoutError as exc:
            raise UnavailableError(f"model '{slot.model_id}' is still loading", retry_after=10) from exc

    # ----- loading, unloading --------------------------------------------------------

    async def _load(self, slot: Slot) -> Engine:
        model_id = slot.model_id
        restart = slot.state is ModelState.FAILED
        slot.mark_loading()
        started = self._clock()
        waking = False
        try:
            # An engine this slot replaces still holds its memory (and its placement,
            # under the same ID) until its last request ends.
            for retiring, task in list(self._retiring.items()):
                if retiring.model_id == model_id and retiring.serial < slot.serial:
                    await asyncio.wait([task])
            async with self._start_lock:
                # Decided under the lock: the watcher may have been putting the model to
                # sleep or unloading it. An engine still here is asleep (a dead one is
                # unloaded before a load is started).
                waking = slot.engine is not None
                slot.mark_loading()
                engine = await (self._wake(slot) if waking else self._start(slot))
        except UnavailableError:
            slot.mark_load_deferred()
            raise
        except Exception as exc:
            what = "failed to wake from sleep" if waking else "failed to load"
            logger.error("model %s %s", model_id, what, exc_info=exc)
            slot.mark_failed(f"{what} ({_public_reason(exc)})")
            raise UnavailableError(
                f"model '{model_id}' {slot.error}", retry_after=max(1.0, slot.retry_at - self._clock())
            ) from exc
        finally:
            slot.load_task = None
        slot.mark_ready(engine, loading_since=started)
        logger.info("model %s ready in %.1f s", model_id, slot.load_seconds)
        if self._telemetry is not None:
            self._telemetry.metrics.loaded(model_id, slot.load_seconds or 0.0, woken=waking, restart=restart)
        _freeze_gc_heap()
        return engine

    async def _start(self, slot: Slot) -> Engine:
        model_id, entry = slot.model_id, slot.registered.entry
        assert entry.source is not None, "an entry with an engine of its own names its weights"
        weights, adapters = entry.source, []
        if self._local_weights:
            weights = await asyncio.to_thread(resolve_source, entry.source, self._home, revision=entry.revision)
            adapters = await asyncio.to_thread(self._resolve_adapters, model_id)
        launch = LaunchOptions(enable_sleep=self._sleep_mode)
        if self._planner is not None:
            placement = await self._make_room(slot, weights)
            slot.set_placement(placement)
            launch = LaunchOptions(
                visible_devices=placement.visible_devices,
                memory_share=placement.memory_share,
                enable_sleep=self._sleep_mode,
            )
        logger.info("loading model %s from %s (%s engine)", model_id, weights, entry.engine)
        if adapters:
            logger.info("model %s serves LoRA adapters %s", model_id, ", ".join(a.name for a in adapters))
        try:
            starters = self._starters or engine_starters(self._telemetry)
            return await starters[entry.engine](model_id, entry, weights, adapters, launch)
        except BaseException:
            self._free_placement(slot)
            raise

    async def _wake(self, slot: Slot) -> Engine:
        engine = slot.engine
        assert engine is not None and slot.placement is not None
        if self._planner is not None:
            await self._make_room(slot, None, on=slot.placement.devices)
        logger.info("waking model %s", slot.model_id)
        try:
            await engine.wake_up()
        except Exception:
            # Half awake is no state to serve from: the engine goes, with its memory,
            # and the next request after the back-off starts a fresh one.
            await self._unload(slot, failed=True)
            raise
        return engine

    async def _make_room(self, slot: Slot, weights: str | None, on: tuple[Device, ...] | None = None) -> Placement:
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
            raise OverBudgetError(
                f"it needs {need / (1 << 30):.1f} GiB on {tp} device(s), more than this server's "
                "memory budget (--memory-budget) offers"
            )
        while (placement := self._planner.place(slot.model_id, need, tp, on=on)) is None:
            victim = pick_victim((s.resident() for s in self._slots.values()), making_room_for=slot.model_id)
            if victim is None:
                busy = ", ".join(s.model_id for s in self._slots.values() if s.placement is not None and s is not slot)
                raise UnavailableError(
                    f"model '{slot.model_id}' does not fit beside the models serving requests "
                    f"now ({busy}); retry when they are idle",
                    retry_after=10,
                )
            await self._evict(self._slots[victim], reason=f"to make room for {slot.model_id}")
        return placement

    async def _evict(self, slot: Slot, *, reason: str) -> None:
        """Free ``slot``'s memory: sleep when the engine can, else unload it.

        The caller holds the start lock.
        """
        engine = slot.engine
        assert engine is not None
        if self._telemetry is not None:
            self._telemetry.metrics.model_evictions.labels(model=slot.model_id).inc()
        if self._sleep_mode and engine.supports_sleep:
            logger.info("putting model %s to sleep %s", slot.model_id, reason)
            slot.mark_sleeping()
            try:
                await engine.sleep()
            except Exception:
                logger.exception("model %s failed to go to sleep; unloading it instead", slot.model_id)
                await self._unload(slot)
                return
            if self._planner is not None:
                self._planner.release(slot.model_id)  # the devices stay recorded in slot.placement
            return
        logger.info("unloading model %s %s", slot.model_id, reason)
        await self._unload(slot)

    async def _unload(self, slot: Slot, *, failed: bool = False) -> None:
        """Shut ``slot``'s engine down, then hand its memory back; the caller holds the start lock.

        ``failed``: the model stays failed (its engine died or failed to wake).
        """
        engine = slot.mark_unloaded(failed=failed)
        try:
            await engine.shutdown()
        except Exception:
            logger.exception("shutting down model %s failed", slot.model_id)
        finally:
            self._free_placement(slot)

    def _free_placement(self, slot: Slot) -> None:
        if self._planner is not None:
            self._planner.release(slot.model_id)
        slot.clear_placement()

    async def _engine_died(self, slot: Slot, engine: Engine) -> None:
        """Fail the model at once, then shut the dead ``engine`` down under the start lock.

        Several requests, and the watcher, may notice the same death: the first says so,
        and only the one that still finds ``engine`` on the slot unloads it.
        """
        if slot.state is not ModelState.FAILED:
            slot.mark_failed("failed: its engine process died")
        async with self._start_lock:
            if slot.engine is engine:
                await self._unload(slot, failed=True)

    def _resolve_adapters(self, base_id: str) -> list[AdapterRef]:
        """The adapters on ``base_id``, their weights made present; blocks (may download).

        An adapter that cannot be made present (say, the hub is unreachable) is left out
        rather than failing the load: the base and its other adapters still serve.
        """
        refs = (self._resolve_adapter(registered) for registered in self._adapters.get(base_id, []))
        return [ref for ref in refs if ref is not None]

    # ----- changing what is served, while serving ----------------------------------

    @property
    def registry(self) -> Registry:
        return self._registry

    async def replace_registry(self, registry: Registry) -> RegistryChanges:
        """Serve ``registry`` from now on; no request in flight is cut short.

        A model whose entry changed in what its engine was started with
        (``live.needs_new_engine``), or that left the registry, gets a fresh slot (or
        none). Its old slot is retired: its engine goes on serving the requests that hold
        it and is shut down once they end (``_retire``); requests that arrive meanwhile go
        to the new slot, whose engine starts only once the old one is gone, so the two
        never count on the same memory. A replaced model that was loaded (and a model
        newly pinned) is loaded again at once. Other entry changes apply in place.

        A new adapter on a base whose engine runs is handed to that engine
        (``Engine.add_adapter``, vLLM's runtime LoRA loading); an engine that cannot take
        it (started without LoRA) is restarted as above. This happens under the start
        lock with the swap itself, so no engine is starting with the old list of adapters
        meanwhile. Changes apply one at a time.
        """
        async with self._registry_lock:
            changes = compare(self._registry, registry)
            async with self._start_lock:
                restart = {m.model_id for m in registry if self._needs_restart(m)}
                live = []
                for adapter in registry:
                    if not self._adapter_is_new(adapter):
                        continue
                    base = adapter.entry.base
                    slot = self._slots.get(base or "")
                    if base in restart or slot is None or slot.engine is None or not self._local_weights:
                        continue  # the base's next engine starts with it (or is not here to take it)
                    ref = await asyncio.to_thread(self._resolve_adapter, adapter)
                    if ref is None:
                        continue  # left out, as at a start: the base serves on
                    if slot.engine.add_adapter(ref):
                        live.append(adapter.model_id)
                        logger.info("model %s serves LoRA adapter %s from now on", slot.model_id, adapter.model_id)
                    else:
                        restart.add(slot.model_id)
                retired, reload = self._install(registry, restart)
            for slot in retired:
                self._retiring[slot] = asyncio.create_task(self._retire(slot))
            for slot in reload:
                task = asyncio.create_task(self._load_in_background(slot))
                self._loads.add(task)
                task.add_done_callback(self._loads.discard)
            restarted = sorted(
                s.model_id for s in retired if (s.engine or s.load_task) is not None and s.model_id in self._slots
            )
            return dataclasses.replace(changes, restarted=tuple(restarted), live_adapters=tuple(live))

    def _needs_restart(self, registered: RegisteredModel) -> bool:
        before = self._registry.model(registered.model_id)
        return (
            not registered.entry.is_adapter
            and before is not None
            and not before.entry.is_adapter
            and needs_new_engine(before.entry, registered.entry)
        )

    def _adapter_is_new(self, registered: RegisteredModel) -> bool:
        """An adapter entry its base's running engine may not have: new, or with other weights."""
        if not registered.entry.is_adapter:
            return False
        before = self._registry.model(registered.model_id)
        return before is None or not before.entry.is_adapter or adapter_weights_changed(before.entry, registered.entry)

    def _install(self, registry: Registry, restart: set[str]) -> tuple[list[Slot], list[Slot]]:
        """Swap to ``registry`` (synchronously: no request sees half of it); the slots
        retired, and the new slots to load at once."""
        slots: dict[str, Slot] = {}
        for registered in registry:
            if registered.entry.is_adapter:
                continue
            slot = self._slots.get(registered.model_id)
            if slot is None or registered.model_id in restart:
                slot = Slot(registered, self._clock)
            else:
                slot.update(registered)
            slots[registered.model_id] = slot
        retired = [slot for slot in self._slots.values() if slots.get(slot.model_id) is not slot]
        reload = [
            slots[old.model_id]
            for old in retired
            if old.model_id in slots and (old.engine is not None or old.load_task is not None)
        ]
        reload += [s for s in slots.values() if s.registered.entry.pinned and s.engine is None and s not in reload]
        adapters: dict[str, list[RegisteredModel]] = {}
        for registered in registry:
            if registered.entry.base is not None:
                adapters.setdefault(registered.entry.base, []).append(registered)
        for adapter_id in list(self._adapter_errors):
            gone = registry.model(adapter_id)
            if gone is None or not gone.entry.is_adapter:
                self._adapter_errors.pop(adapter_id)
        self._registry, self._slots, self._adapters = registry, slots, adapters
        return retired, reload

    async def _retire(self, slot: Slot) -> None:
        """Shut a retired slot's engine down once the requests that hold it have ended."""
        try:
            if slot.load_task is not None:
                await asyncio.wait([slot.load_task])
            await slot.drained()
            async with self._start_lock:
                if slot.engine is not None:
                    logger.info("unloading model %s: its registry entry was replaced or removed", slot.model_id)
                    await self._unload(slot)
        finally:
            self._retiring.pop(slot, None)

    async def _load_in_background(self, slot: Slot) -> None:
        try:
            await self._ready_engine(slot)
        except Exception as exc:
            logger.error("loading %s after a registry change failed: %s", slot.model_id, exc)

    async def load(self, name: str) -> None:
        """Load the engine serving ``name`` now, as a first request would."""
        slot = self._slot_of(self.lookup(name))
        slot.hold()
        try:
            await self._ready_engine(slot)
        finally:
            slot.let_go()

    async def unload(self, name: str) -> None:
        """Unload the engine serving ``name`` now.

        ``ConflictError`` while the engine serves or waits for requests, or the model is
        pinned: an unload never cuts a request short. The next request loads it again.
        """
        registered = self.lookup(name)
        if registered.entry.base is not None:
            raise ConflictError(
                f"'{name}' is a LoRA adapter served by the engine of model '{registered.entry.base}'; unload that model",
                param="model",
            )
        slot = self._slot_of(registered)
        if slot.registered.entry.pinned:
            raise ConflictError(f"model '{slot.model_id}' is pinned; unpin it first", param="model")
        async with self._start_lock:
            if slot.holders:
                raise ConflictError(
                    f"model '{slot.model_id}' is serving {slot.holders} request(s); unload it once they have ended",
                    param="model",
                )
            if slot.engine is not None and self._slots.get(slot.model_id) is slot:
                logger.info("unloading model %s, as an operator asked", slot.model_id)
                await self._unload(slot)

    def _resolve_adapter(self, registered: RegisteredModel) -> AdapterRef | None:
        """One adapter's weights made present; blocks. None (and the reason recorded, as
        at a start) when they cannot be."""
        entry = registered.entry
        assert entry.adapter is not None, "an entry on a base is a LoRA adapter"
        try:
            path = resolve_source(entry.adapter, self._home, revision=entry.revision)
            ref = AdapterRef(registered.model_id, path, lora_rank(path))
        except Exception as exc:
            self._adapter_errors[registered.model_id] = f"failed to load ({_public_reason(exc)})"
            logger.error("LoRA adapter %s left out of model %s", registered.model_id, entry.base, exc_info=exc)
            return None
        self._adapter_errors.pop(registered.model_id, None)
        return ref

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
        """Unload models past their keep-alive; notice engines that died while idle.

        A check that raises is logged and watching goes on: a watcher that stopped would
        silently end keep-alive and liveness checks for good.
        """
        while True:
            await asyncio.sleep(WATCH_INTERVAL_SECONDS)
            for slot in list(self._slots.values()):
                try:
                    await self._watch_slot(slot)
                except Exception:
                    logger.exception("watching model %s failed; watching goes on", slot.model_id)

    async def _watch_slot(self, slot: Slot) -> None:
        engine = slot.engine
        if engine is None or slot.load_task is not None:
            return
        if not engine.alive:
            await self._engine_died(slot, engine)
            return
        keep_alive = slot.registered.entry.keep_alive or self._keep_alive
        if keep_alive is None or not self._unused_for(slot, keep_alive):
            return
        async with self._start_lock:
            # A request may have taken the model, or a load put it away, meanwhile.
            if self._unused_for(slot, keep_alive):
                await self._evict(slot, reason=f"after {keep_alive:g} s unused (keep-alive)")

    def _unused_for(self, slot: Slot, seconds: float) -> bool:
        return slot.evictable and self._clock() - slot.last_used > seconds

    def is_ready(self, names: Iterable[str]) -> bool:
        # A model removed from the registry since start-up (admin API) is waited for no more.
        return all(self._slot_of(self.lookup(n)).state is ModelState.READY for n in names if n in self._registry)

    def status(self) -> list[ModelStatus]:
        """Every registered model; an adapter shows the state of its base's engine."""
        now = self._clock()
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
        # Retired slots still holding engines go down with the rest.
        slots = [*self._slots.values(), *self._retiring]
        for task in [*self._retiring.values(), *self._loads]:
            task.cancel()
        for slot in slots:
            if slot.load_task is not None:
                slot.load_task.cancel()
        # The cancelled loads and watcher let go of the lock as they end.
        async with self._start_lock:
            for slot in slots:
                if slot.engine is not None:
                    logger.info("shutting down model %s", slot.model_id)
                    await self._unload(slot)


def _device_name(device: Device) -> str:
    """A device as metrics label it: ``gpu0``, ``gpu1`` ... or ``host``."""
    return "host" if device.index is None else f"gpu{device.index}"


def _public_reason(exc: BaseException) -> str:
    """What a client may see of ``exc``: its type, and the message only where the server
    wrote it for clients (``_PUBLIC_ERRORS``), with local paths cut out.

    Other messages are written for developers and name weight, cache and adapter paths;
    they stay in the server log.
    """
    name = type(exc).__name__
    if not isinstance(exc, _PUBLIC_ERRORS):
        return f"{name}; the server log has the details"
    text = _LOCAL_PATH.sub("<local path>", str(exc).strip())
    return f"{name}: {text[:500]}"


def _freeze_gc_heap() -> None:
    """Move everything alive after a load out of the garbage collector's sight.

    An engine load leaves millions of long-lived objects (tokenizer, configs, torch and
    vLLM modules); without this, every full collection walks them all and stalls the
    event loop mid-stream for hundreds of milliseconds. vLLM's own server does the same
    once after start-up; a pool that loads engines later does it after each load.
    """
    gc.collect()
    gc.freeze()
