"""Which engine serves a model: loading on demand, one load at a time, load failures.

The pool is the only owner of engines. A request asks for a model by ID or alias; the
pool starts its engine on first use (or at start-up for preloaded models) and every
concurrent request for a model that is loading waits on that one load instead of
starting a second. Engines start one after another because vLLM sizes its memory from
what is free at start-up, and two engines profiling at once mis-size each other.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from server.engines.base import Engine
from server.errors import ModelNotFoundError, UnavailableError
from server.registry import ModelEntry, RegisteredModel, Registry
from server.weights import resolve_source

logger = logging.getLogger(__name__)

EngineStarter = Callable[[str, ModelEntry, str], Awaitable[Engine]]


def _start_vllm(model_id: str, entry: ModelEntry, weights: str) -> Awaitable[Engine]:
    from server.engines.vllm_engine import VLLMEngine

    return VLLMEngine.start(model_id, entry, weights)


ENGINE_STARTERS: dict[str, EngineStarter] = {"vllm": _start_vllm}


class ModelState(str, enum.Enum):
    NOT_LOADED = "not_loaded"
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


@dataclass(frozen=True)
class ModelStatus:
    model_id: str
    aliases: tuple[str, ...]
    source: str | None
    engine: str
    state: ModelState
    running: int
    error: str | None
    load_seconds: float | None


class _Slot:
    def __init__(self, registered: RegisteredModel):
        self.registered = registered
        self.state = ModelState.NOT_LOADED
        self.engine: Engine | None = None
        self.error: str | None = None
        self.failed_at = 0.0
        self.load_seconds: float | None = None
        self.load_task: asyncio.Task[Engine] | None = None


class EnginePool:
    def __init__(
        self,
        registry: Registry,
        *,
        home: Path,
        load_timeout: float = 900.0,
        retry_after_failure: float = 10.0,
        starters: dict[str, EngineStarter] | None = None,
    ):
        self._registry = registry
        self._home = home
        self._load_timeout = load_timeout
        self._retry_after_failure = retry_after_failure
        self._starters = starters or ENGINE_STARTERS
        self._slots = {m.model_id: _Slot(m) for m in registry}
        self._start_lock = asyncio.Lock()
        self._closed = False

    def lookup(self, name: str) -> RegisteredModel:
        registered = self._registry.resolve(name)
        if registered is None:
            raise ModelNotFoundError(
                f"model '{name}' is not in the registry; GET /v4/models lists the models this "
                "server can serve, and an operator can add one with --registry FILE",
                param="model",
            )
        return registered

    async def acquire(self, name: str) -> Engine:
        """The ready engine for ``name``, loading it first if needed."""
        slot = self._slots[self.lookup(name).model_id]
        if slot.engine is not None:
            return slot.engine
        if self._closed:
            raise UnavailableError("the server is shutting down")
        if slot.state is ModelState.FAILED:
            wait = slot.failed_at + self._retry_after_failure - time.monotonic()
            if wait > 0:
                raise UnavailableError(
                    f"model '{slot.registered.model_id}' failed to load: {slot.error}",
                    retry_after=wait,
                )
        if slot.load_task is None:
            slot.load_task = asyncio.create_task(self._load(slot))
        try:
            return await asyncio.wait_for(asyncio.shield(slot.load_task), self._load_timeout)
        except TimeoutError as exc:
            raise UnavailableError(
                f"model '{slot.registered.model_id}' is still loading", retry_after=10
            ) from exc

    async def _load(self, slot: _Slot) -> Engine:
        model_id, entry = slot.registered.model_id, slot.registered.entry
        slot.state, slot.error = ModelState.LOADING, None
        started = time.monotonic()
        try:
            async with self._start_lock:
                weights = await asyncio.to_thread(resolve_source, entry.source, self._home)
                logger.info("loading model %s from %s (%s engine)", model_id, weights, entry.engine)
                engine = await self._starters[entry.engine](model_id, entry, weights)
        except Exception as exc:
            slot.state, slot.error, slot.failed_at = ModelState.FAILED, _reason(exc), time.monotonic()
            logger.error("model %s failed to load: %s", model_id, slot.error)
            raise UnavailableError(
                f"model '{model_id}' failed to load: {slot.error}", retry_after=self._retry_after_failure
            ) from exc
        finally:
            slot.load_task = None
        slot.engine, slot.state = engine, ModelState.READY
        slot.load_seconds = time.monotonic() - started
        logger.info("model %s ready in %.1f s", model_id, slot.load_seconds)
        return engine

    def is_ready(self, names: Iterable[str]) -> bool:
        return all(self._slots[self.lookup(n).model_id].state is ModelState.READY for n in names)

    def status(self) -> list[ModelStatus]:
        return [
            ModelStatus(
                model_id=model_id,
                aliases=slot.registered.entry.aliases,
                source=slot.registered.entry.source,
                engine=slot.registered.entry.engine,
                state=slot.state,
                running=slot.engine.stats().running if slot.engine is not None else 0,
                error=slot.error,
                load_seconds=slot.load_seconds,
            )
            for model_id, slot in self._slots.items()
        ]

    async def shutdown(self) -> None:
        self._closed = True
        for slot in self._slots.values():
            if slot.load_task is not None:
                slot.load_task.cancel()
            if slot.engine is not None:
                engine, slot.engine, slot.state = slot.engine, None, ModelState.NOT_LOADED
                await engine.shutdown()


def _reason(exc: BaseException) -> str:
    """The most specific message in an exception chain: vLLM wraps start-up errors."""
    while exc.__cause__ is not None and not str(exc):
        exc = exc.__cause__
    text = str(exc) or type(exc).__name__
    return text.strip().splitlines()[-1][:500]
