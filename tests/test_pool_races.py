"""Races and failures in the pool's engine lifecycle, staged deterministically.

The real ``EnginePool`` runs here with the stand-in engine of tests/test_pool_gpu_paths.py
(which says why a stand-in: sleep mode and placement are GPU-only), scripted so a test
can hold an engine inside ``sleep``, ``wake_up`` or ``shutdown`` until it lets go, make
a call fail, or declare the engine dead. Every engine and the pool's starter write what
they do to one log, so the order of events can be checked.

Races are staged with events, never with timing: a test holds one party at the racy
point, lets the event loop run until the other is visibly waiting (or done), then lets
the first go. Time is a fake clock handed to the pool, so keep-alive and back-off are
decided by the test, not by the machine's speed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import pytest

from server.engines.base import AdapterRef, LaunchOptions
from server.errors import UnavailableError
from server.pool import EnginePool, ModelStatus
from server.pool import pool as pool_module
from server.pool.placement import Device
from server.pool.slot import HEALTHY_SECONDS
from server.registry import ModelEntry, RegisteredModel, Registry
from tests.test_pool_gpu_paths import StandInGpuEngine

GiB = 1 << 30
ONE_GPU = [Device(0, 72 * GiB, 80 * GiB)]
# Two of these do not fit on ONE_GPU together.
HALF = {"memory": "40GiB"}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class ScriptedEngine(StandInGpuEngine):
    """The stand-in, with calls a test can hold (``hold``) or make raise (``fail``)."""

    def __init__(self, model_id: str, launch: LaunchOptions, log: list[str]):
        super().__init__(model_id, launch)
        self.log = log
        self.hold: dict[str, asyncio.Event] = {}
        self.fail: set[str] = set()
        self.is_alive = True
        self.asleep = False
        self.shut_down = False

    async def _call(self, name: str) -> None:
        self.calls.append(name)
        self.log.append(f"{self.model_id}:{name}")
        if name in self.hold:
            await self.hold[name].wait()
        if name in self.fail:
            raise RuntimeError(f"{name} failed: /opt/secret/{self.model_id}/weights.bin is unreadable")
        self.log.append(f"{self.model_id}:{name} done")

    async def sleep(self) -> None:
        await self._call("sleep")
        self.asleep = True

    async def wake_up(self) -> None:
        await self._call("wake_up")
        self.asleep = False

    async def shutdown(self) -> None:
        await self._call("shutdown")
        self.shut_down = True

    @property
    def alive(self) -> bool:
        if "alive" in self.fail:
            self.fail.discard("alive")  # raises once
            raise RuntimeError("liveness check failed")
        return self.is_alive


class Scene:
    """A pool of scripted engines, the engines it started (per model) and the shared log."""

    def __init__(self, tmp_path: Path, entries: dict[str, dict], *, sleep_mode: bool = False):
        self.clock = Clock()
        self.log: list[str] = []
        self.engines: dict[str, list[ScriptedEngine]] = defaultdict(list)
        self.starter_error: Exception | None = None
        weights = tmp_path / "weights"
        weights.mkdir(exist_ok=True)
        registry = Registry(
            {
                model_id: RegisteredModel(
                    model_id,
                    ModelEntry(**({} if "adapter" in fields else {"source": str(weights)}) | fields),
                    tmp_path / "ops.yaml",
                )
                for model_id, fields in entries.items()
            }
        )
        self.pool = EnginePool(
            registry,
            home=tmp_path,
            devices=ONE_GPU,
            sleep_mode=sleep_mode,
            starters={"vllm": self._start},
            clock=self.clock,
        )

    async def _start(
        self, model_id: str, entry: ModelEntry, weights: str, adapters: Sequence[AdapterRef], launch: LaunchOptions
    ) -> ScriptedEngine:
        self.log.append(f"{model_id}:start")
        if self.starter_error is not None:
            raise self.starter_error
        engine = ScriptedEngine(model_id, launch, self.log)
        self.engines[model_id].append(engine)
        return engine

    def engine(self, model_id: str) -> ScriptedEngine:
        """The model's newest engine."""
        return self.engines[model_id][-1]

    def status(self, model_id: str) -> ModelStatus:
        return next(s for s in self.pool.status() if s.model_id == model_id)

    def state(self, model_id: str) -> str:
        return self.status(model_id).state.value

    async def use(self, model_id: str) -> None:
        lease = await self.pool.lease(model_id)
        lease.release()

    @contextlib.asynccontextmanager
    async def watching(self, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[None]:
        """The pool's own watcher running, checking on every turn of the event loop."""
        monkeypatch.setattr(pool_module, "WATCH_INTERVAL_SECONDS", 0)
        await self.pool.start([])
        try:
            yield
        finally:
            await self.pool.shutdown()


async def until(condition: Callable[[], bool], *, steps: int = 1000) -> None:
    """Let the event loop run until ``condition`` holds, counted in loop turns, not seconds."""
    for _ in range(steps):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("the condition never held")


async def test_a_request_during_a_keep_alive_sleep_wakes_the_model_after_it(tmp_path, monkeypatch) -> None:
    scene = Scene(tmp_path, {"a": {**HALF, "keep_alive": 5}, "b": HALF}, sleep_mode=True)
    await scene.use("a")
    a = scene.engine("a")
    a.hold["sleep"] = asyncio.Event()
    async with scene.watching(monkeypatch):
        scene.clock.now += 10
        await until(lambda: "a:sleep" in scene.log)  # the watcher is inside a's sleep
        request = asyncio.create_task(scene.pool.lease("a"))
        await until(lambda: request.done() or scene.state("a") == "loading")
        a.hold["sleep"].set()
        lease = await request
        await until(lambda: "a:sleep done" in scene.log)
        # Woken after its sleep ended, not during it: it serves awake...
        assert scene.log.index("a:sleep done") < scene.log.index("a:wake_up")
        assert (scene.state("a"), a.asleep) == ("ready", False)
        # ...and its memory is still reserved: b does not fit beside it.
        with pytest.raises(UnavailableError, match="does not fit"):
            await scene.pool.lease("b")
        lease.release()


async def test_a_model_that_fails_to_wake_is_unloaded_and_the_next_request_reloads_it(tmp_path) -> None:
    scene = Scene(tmp_path, {"a": HALF, "b": HALF}, sleep_mode=True)
    await scene.use("a")
    await scene.use("b")  # a sleeps to make room
    asleep = scene.engine("a")
    asleep.fail.add("wake_up")
    with pytest.raises(UnavailableError) as failed:
        await scene.pool.lease("a")
    assert "failed to wake" in failed.value.message
    assert asleep.shut_down  # not left half awake, holding memory
    assert scene.state("a") == "failed"
    await scene.use("a")  # a first failure is retried at once: a fresh engine, with room for it
    assert len(scene.engines["a"]) == 2
    assert (scene.state("a"), scene.state("b")) == ("ready", "sleeping")


async def test_the_memory_of_an_unloading_model_is_reused_only_after_its_engine_shut_down(
    tmp_path, monkeypatch
) -> None:
    scene = Scene(tmp_path, {"a": {**HALF, "keep_alive": 5}, "b": HALF})
    await scene.use("a")
    scene.engine("a").hold["shutdown"] = release = asyncio.Event()
    async with scene.watching(monkeypatch):
        scene.clock.now += 10
        await until(lambda: "a:shutdown" in scene.log)  # keep-alive is unloading a
        assert scene.status("a").memory == 40 * GiB  # still reserved while it shuts down
        request = asyncio.create_task(scene.pool.lease("b"))
        await until(lambda: request.done() or scene.state("b") == "loading")
        release.set()
        (await request).release()
    assert scene.log.index("a:shutdown done") < scene.log.index("b:start")
    assert scene.status("a").memory is None


async def test_an_engine_that_keeps_dying_is_restarted_with_a_growing_back_off(tmp_path) -> None:
    scene = Scene(tmp_path, {"a": HALF})
    await scene.use("a")
    scene.engine("a").is_alive = False
    await scene.use("a")  # the first failure is retried at once: maybe a one-off
    assert len(scene.engines["a"]) == 2
    for wait in (2, 4, 8):
        scene.engine("a").is_alive = False
        with pytest.raises(UnavailableError) as refused:
            await scene.pool.lease("a")
        assert refused.value.retry_after == wait
        scene.clock.now += wait - 0.5
        with pytest.raises(UnavailableError):
            await scene.pool.lease("a")
        scene.clock.now += 0.5
        await scene.use("a")
    assert len(scene.engines["a"]) == 5
    # An engine that served long enough wipes the slate: its death is a first failure again.
    scene.clock.now += HEALTHY_SECONDS
    scene.engine("a").is_alive = False
    await scene.use("a")
    assert len(scene.engines["a"]) == 6


async def test_the_watcher_survives_a_check_that_raises(tmp_path, monkeypatch, caplog) -> None:
    scene = Scene(tmp_path, {"a": {**HALF, "keep_alive": 5}})
    await scene.use("a")
    a = scene.engine("a")
    a.fail.add("alive")  # the watcher's next liveness check of a raises
    with caplog.at_level(logging.ERROR, logger=pool_module.__name__):
        async with scene.watching(monkeypatch):
            await until(lambda: "alive" not in a.fail)
            scene.clock.now += 10
            await until(lambda: a.shut_down)  # keep-alive still works after it
    assert "liveness check failed" in caplog.text


async def test_a_model_that_fails_to_sleep_is_unloaded_instead(tmp_path, monkeypatch) -> None:
    scene = Scene(tmp_path, {"a": {**HALF, "keep_alive": 5}, "b": HALF}, sleep_mode=True)
    await scene.use("a")
    a = scene.engine("a")
    a.fail.add("sleep")
    async with scene.watching(monkeypatch):
        scene.clock.now += 10
        await until(lambda: a.shut_down)
        assert scene.state("a") == "not_loaded"
        await scene.use("b")  # a's memory is free: b needs no eviction
        assert scene.log[-1] == "b:start"


# What a failure shows: the type and what failed, never local paths ----------------


async def test_a_failed_load_shows_what_failed_without_local_paths(tmp_path, caplog) -> None:
    scene = Scene(tmp_path, {"a": HALF})
    secret = tmp_path / "weights" / "model-00001.safetensors"
    scene.starter_error = OSError(f"unable to mmap {secret}: No such device")
    with caplog.at_level(logging.ERROR, logger=pool_module.__name__), pytest.raises(UnavailableError) as failed:
        await scene.pool.lease("a")
    message = failed.value.message
    assert message.startswith("model 'a' failed to load (OSError")
    assert str(tmp_path) not in message
    assert scene.status("a").error in message
    assert str(secret) in caplog.text  # the operator still gets the whole story


async def test_a_hub_error_keeps_its_advice_but_not_the_cache_path(tmp_path, monkeypatch) -> None:
    from huggingface_hub import constants

    cache = tmp_path / "private-hf-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    scene = Scene(tmp_path, {"a": {**HALF, "source": "example-org/absent"}})
    with pytest.raises(UnavailableError) as failed:
        await scene.pool.lease("a")
    message = failed.value.message
    assert "HubError" in message and "HF_HUB_OFFLINE is set" in message
    assert "'example-org/absent' is not in the local Hugging Face cache" in message
    assert str(cache) not in message and str(tmp_path) not in message


async def test_an_adapter_that_failed_shows_no_local_path(tmp_path, caplog) -> None:
    missing = tmp_path / "adapters" / "tiny-lora"
    scene = Scene(tmp_path, {"a": HALF, "a-lora": {"base": "a", "adapter": str(missing)}})
    await scene.use("a")  # the base serves without the adapter
    with caplog.at_level(logging.ERROR, logger=pool_module.__name__), pytest.raises(UnavailableError) as failed:
        await scene.pool.lease("a-lora")
    message = failed.value.message
    assert message.startswith("LoRA adapter 'a-lora' failed to load (ValueError")
    assert str(tmp_path) not in message
    assert scene.status("a-lora").error in message
    assert str(missing) in caplog.text
