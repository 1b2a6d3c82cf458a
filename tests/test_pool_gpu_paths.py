"""The pool's GPU-only paths: placement on several GPUs and sleep mode.

No GPU exists on the machines that run this suite, and vLLM's sleep mode is a no-op on
CPU, so these tests start a stand-in engine through the pool's starter hook. The stand-in
(which tests/test_pool_races.py scripts further) is the one mock in the suite; it records what the pool asked of it (devices, memory share,
sleep, wake) so the pool's decisions can be checked. Everything CPU engines do is tested
on the real engine elsewhere (tests/test_multi_model.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import pytest

from server.engines.base import AdapterRef, Engine, EngineStats, LaunchOptions
from server.pool import EnginePool
from server.pool.placement import Device
from server.registry import ModelEntry, RegisteredModel, Registry

GiB = 1 << 30


class StandInGpuEngine(Engine):
    """Records the pool's requests; generates nothing (no GPU here)."""

    def __init__(self, model_id: str, launch: LaunchOptions):
        self.model_id, self.launch, self.max_model_len = model_id, launch, 2048
        self.calls: list[str] = []

    async def apply_chat_template(self, messages: Sequence[dict[str, str]]) -> str:
        raise NotImplementedError

    async def prepare(self, prompt, sampling, **kwargs):
        raise NotImplementedError

    async def generate(self, request, request_id) -> AsyncIterator:
        raise NotImplementedError
        yield

    async def abort(self, request_id: str) -> None: ...

    def stats(self) -> EngineStats:
        return EngineStats(running=0)

    async def shutdown(self) -> None:
        self.calls.append("shutdown")

    @property
    def supports_sleep(self) -> bool:
        return self.launch.enable_sleep

    async def sleep(self) -> None:
        self.calls.append("sleep")

    async def wake_up(self) -> None:
        self.calls.append("wake_up")


def make_pool(
    entries: dict[str, dict], devices: list[Device], *, sleep_mode: bool, tmp_path
) -> tuple[EnginePool, dict]:
    started: dict[str, StandInGpuEngine] = {}

    async def start(
        model_id: str, entry: ModelEntry, weights: str, adapters: Sequence[AdapterRef], launch: LaunchOptions
    ):
        started[model_id] = StandInGpuEngine(model_id, launch)
        return started[model_id]

    weights = tmp_path / "weights"
    weights.mkdir(exist_ok=True)
    registry = Registry(
        {
            model_id: RegisteredModel(model_id, ModelEntry(source=str(weights), **fields), tmp_path / "ops.yaml")
            for model_id, fields in entries.items()
        }
    )
    pool = EnginePool(registry, home=tmp_path, devices=devices, sleep_mode=sleep_mode, starters={"vllm": start})
    return pool, started


async def use(pool: EnginePool, model: str) -> None:
    lease = await pool.lease(model)
    lease.release()


async def test_tensor_parallel_models_get_their_own_gpus_and_shares_add_up(tmp_path) -> None:
    gpus = [Device(i, 72 * GiB, 80 * GiB) for i in range(4)]
    pool, started = make_pool(
        {
            "big": {"memory": "140GiB", "tensor_parallel_size": 2},
            "small-1": {"memory": "30GiB"},
            "small-2": {"memory": "30GiB"},
        },
        gpus,
        sleep_mode=False,
        tmp_path=tmp_path,
    )
    for model in ("small-1", "small-2", "big"):
        await use(pool, model)
    assert started["small-1"].launch.visible_devices == started["small-2"].launch.visible_devices
    assert started["small-1"].launch.memory_share == pytest.approx(30 / 80)
    big_gpus = set(started["big"].launch.visible_devices.split(","))
    assert len(big_gpus) == 2 and started["small-1"].launch.visible_devices not in big_gpus
    assert started["big"].launch.memory_share == pytest.approx(70 / 80)


async def test_sleep_mode_parks_the_idle_model_and_wakes_it_on_the_same_gpu(tmp_path) -> None:
    gpu = [Device(0, 72 * GiB, 80 * GiB)]
    pool, started = make_pool(
        {"a": {"memory": "40GiB"}, "b": {"memory": "40GiB"}}, gpu, sleep_mode=True, tmp_path=tmp_path
    )
    await use(pool, "a")
    await use(pool, "b")  # does not fit beside a: a sleeps instead of unloading
    states = {s.model_id: s.state.value for s in pool.status()}
    assert states == {"a": "sleeping", "b": "ready"}
    assert started["a"].calls == ["sleep"]
    await use(pool, "a")  # b sleeps, a wakes: no second engine start
    states = {s.model_id: s.state.value for s in pool.status()}
    assert states == {"a": "ready", "b": "sleeping"}
    assert started["a"].calls == ["sleep", "wake_up"]
    assert started["b"].calls == ["sleep"]
    await pool.shutdown()
    assert started["a"].calls[-1] == started["b"].calls[-1] == "shutdown"


async def test_without_sleep_mode_the_idle_model_is_unloaded(tmp_path) -> None:
    gpu = [Device(0, 72 * GiB, 80 * GiB)]
    pool, started = make_pool(
        {"a": {"memory": "40GiB"}, "b": {"memory": "40GiB"}}, gpu, sleep_mode=False, tmp_path=tmp_path
    )
    await use(pool, "a")
    await use(pool, "b")
    assert started["a"].calls == ["shutdown"]
    assert {s.model_id: s.state.value for s in pool.status()} == {"a": "not_loaded", "b": "ready"}


async def test_a_model_serving_requests_is_never_evicted(tmp_path) -> None:
    gpu = [Device(0, 72 * GiB, 80 * GiB)]
    pool, _ = make_pool({"a": {"memory": "40GiB"}, "b": {"memory": "40GiB"}}, gpu, sleep_mode=False, tmp_path=tmp_path)
    held = await pool.lease("a")
    from server.errors import UnavailableError

    with pytest.raises(UnavailableError) as refused:
        await pool.lease("b")
    assert "does not fit beside the models serving requests" in refused.value.message
    assert refused.value.retry_after is not None
    held.release()
    await use(pool, "b")
