"""The pool's decision logic on its own: admission limits, device placement and eviction.

These parts decide without an engine, so they are tested directly; the tests of the
whole pool (tests/test_multi_model.py) run real engines through the real server.
"""

from __future__ import annotations

import asyncio

import pytest

from server.errors import OverloadedError
from server.pool.admission import AdmissionGate
from server.pool.eviction import Resident, pick_victim
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


def resident(
    model_id: str, last_used: float, *, ready: bool = True, pinned: bool = False, holders: int = 0
) -> Resident:
    return Resident(model_id, ready=ready, pinned=pinned, holders=holders, last_used=last_used)


def test_the_least_recently_used_idle_model_is_evicted_first() -> None:
    residents = [resident("a", 30.0), resident("b", 10.0), resident("c", 20.0)]
    assert pick_victim(residents, making_room_for="new") == "b"
    assert pick_victim(residents, making_room_for="b") == "c"  # never the model that needs the room


def test_pinned_serving_and_unready_models_are_never_evicted() -> None:
    residents = [
        resident("pinned", 1.0, pinned=True),
        resident("serving", 2.0, holders=1),
        resident("asleep-or-loading", 3.0, ready=False),
        resident("idle", 9.0),
    ]
    assert pick_victim(residents, making_room_for="new") == "idle"
    assert pick_victim(residents[:3], making_room_for="new") is None
    assert pick_victim([], making_room_for="new") is None


def test_on_a_tie_the_first_listed_model_is_evicted() -> None:
    residents = [resident("first", 5.0), resident("second", 5.0)]
    assert pick_victim(residents, making_room_for="new") == "first"
    assert pick_victim(reversed(residents), making_room_for="new") == "second"


def test_evicting_the_victim_and_placing_again_makes_room_as_the_pool_does() -> None:
    # The pool's loop: while the planner finds no place, evict the model pick_victim names.
    planner = DevicePlanner([Device(0, 70 * GiB, 80 * GiB)])
    used = {"old": 1.0, "newer": 2.0, "busy": 0.5}
    for model_id in used:
        assert planner.place(model_id, 20 * GiB) is not None
    residents = {m: resident(m, t, holders=int(m == "busy")) for m, t in used.items()}
    evicted = []
    while planner.place("big", 40 * GiB) is None:
        victim = pick_victim(residents.values(), making_room_for="big")
        assert victim is not None
        planner.release(victim)
        del residents[victim]
        evicted.append(victim)
    assert evicted == ["old", "newer"]  # the serving model stays, though it was used first
