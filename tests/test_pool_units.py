"""The pool's decision logic on its own: admission limits and device placement.

These parts decide without an engine, so they are tested directly; the tests of the
whole pool (tests/test_multi_model.py) run real engines through the real server.
"""

from __future__ import annotations

import asyncio

import pytest

from server.errors import OverloadedError
from server.pool.admission import AdmissionGate
from server.pool.placement import Device, DevicePlanner

GiB = 1 << 30


async def test_gate_admits_up_to_the_running_limit_then_queues_in_order() -> None:
    gate = AdmissionGate("m", max_running=2, max_queued=2)
    first, second = await gate.enter(), await gate.enter()
    order: list[str] = []

    async def queued(name: str) -> None:
        started = await gate.enter()
        order.append(name)
        gate.leave(started)

    waiting = [asyncio.create_task(queued("a")), asyncio.create_task(queued("b"))]
    await asyncio.sleep(0)
    assert (gate.running, gate.queued) == (2, 2)
    with pytest.raises(OverloadedError) as refused:
        await gate.enter()
    assert refused.value.retry_after is not None and refused.value.retry_after >= 1
    gate.leave(first)
    gate.leave(second)
    await asyncio.gather(*waiting)
    assert order == ["a", "b"]
    assert (gate.running, gate.queued) == (0, 0)


async def test_a_caller_that_gives_up_in_the_queue_leaves_no_trace() -> None:
    gate = AdmissionGate("m", max_running=1, max_queued=1)
    held = await gate.enter()
    waiter = asyncio.create_task(gate.enter())
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert gate.queued == 0
    gate.leave(held)
    assert gate.running == 0
    await gate.enter()  # the slot is free again
    assert gate.running == 1


def test_planner_packs_models_and_refuses_what_does_not_fit() -> None:
    planner = DevicePlanner([Device(0, 70 * GiB, 80 * GiB), Device(1, 70 * GiB, 80 * GiB)])
    a = planner.place("a", 30 * GiB)
    b = planner.place("b", 30 * GiB)
    assert a is not None and b is not None
    assert a.devices == b.devices  # packed on one GPU, the other stays whole
    assert a.memory_share == pytest.approx(30 / 80)
    big = planner.place("big", 100 * GiB, tensor_parallel_size=2)
    assert big is None  # needs 50 GiB on each of two GPUs; one has only 10 left
    assert planner.fits_at_all(100 * GiB, tensor_parallel_size=2)
    planner.release("a")
    planner.release("b")
    big = planner.place("big", 100 * GiB, tensor_parallel_size=2)
    assert big is not None and big.visible_devices == "0,1"
    assert planner.place("c", 30 * GiB) is None


def test_host_device_has_no_visible_gpus() -> None:
    planner = DevicePlanner([Device(None, 4 * GiB, 24 * GiB)])
    placement = planner.place("tiny", 1 * GiB)
    assert placement is not None and placement.visible_devices is None
    assert planner.place("too-big", 5 * GiB) is None
    assert not planner.fits_at_all(5 * GiB)
