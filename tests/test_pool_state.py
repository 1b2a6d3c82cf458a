"""One model's state in the pool (``Slot``): its transitions, and the ones it refuses.

The slot decides nothing by itself and runs no engine, so it is tested directly with a
fake clock; how the pool drives it through loads, races and failures is tested in
tests/test_pool_races.py and tests/test_pool_gpu_paths.py.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from server.engines.base import LaunchOptions
from server.pool.slot import HEALTHY_SECONDS, ModelState, Slot
from server.registry import ModelEntry, RegisteredModel
from tests.test_pool_gpu_paths import StandInGpuEngine

NOT_LOADED, LOADING, READY, SLEEPING, FAILED = (
    ModelState.NOT_LOADED,
    ModelState.LOADING,
    ModelState.READY,
    ModelState.SLEEPING,
    ModelState.FAILED,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_slot(clock: Clock, **fields: object) -> Slot:
    entry = ModelEntry(source="/weights/m", **fields)
    return Slot(RegisteredModel("m", entry, Path("ops.yaml")), clock)


def engine() -> StandInGpuEngine:
    return StandInGpuEngine("m", LaunchOptions())


def test_a_model_loads_sleeps_wakes_and_unloads() -> None:
    clock = Clock()
    slot = make_slot(clock)
    assert (slot.state, slot.engine, slot.last_used) == (NOT_LOADED, None, 1000.0)
    slot.mark_loading()
    started = clock.now
    clock.now += 3
    first = engine()
    slot.mark_ready(first, loading_since=started)
    assert (slot.state, slot.engine, slot.error) == (READY, first, None)
    assert (slot.ready_at, slot.last_used, slot.load_seconds) == (1003.0, 1003.0, 3.0)
    slot.mark_sleeping()
    assert (slot.state, slot.engine, slot.ready_at) == (SLEEPING, first, None)
    slot.mark_loading()  # to wake: the engine stays
    assert (slot.state, slot.engine) == (LOADING, first)
    slot.mark_ready(first, loading_since=clock.now)
    assert slot.mark_unloaded() is first  # handed to the caller, to shut down
    assert (slot.state, slot.engine, slot.ready_at) == (NOT_LOADED, None, None)


def test_failures_count_in_a_row_with_a_growing_back_off_until_an_engine_serves_long_enough() -> None:
    clock = Clock()
    slot = make_slot(clock)
    for failures, backoff in ((1, 0.0), (2, 2.0), (3, 4.0)):
        slot.mark_loading()
        slot.mark_failed("failed to load (OSError; the server log has the details)")
        assert (slot.state, slot.failures, slot.retry_at) == (FAILED, failures, clock.now + backoff)
        assert slot.error == "failed to load (OSError; the server log has the details)"
    slot.mark_loading()
    slot.mark_ready(engine(), loading_since=clock.now)
    assert (slot.error, slot.failures) == (None, 3)  # a load alone forgives nothing
    clock.now += HEALTHY_SECONDS - 1
    slot.mark_failed("failed: its engine process died")
    assert slot.failures == 4  # it died before serving long enough
    slot.mark_unloaded(failed=True)
    assert (slot.state, slot.engine, slot.error) == (FAILED, None, "failed: its engine process died")
    slot.mark_loading()
    slot.mark_ready(engine(), loading_since=clock.now)
    clock.now += HEALTHY_SECONDS
    slot.mark_sleeping()  # it served long enough: the slate is wiped
    assert slot.failures == 0


def test_a_load_without_room_goes_back_to_where_it_was() -> None:
    slot = make_slot(Clock())
    slot.mark_loading()
    slot.mark_load_deferred()
    assert slot.state is NOT_LOADED
    slot.mark_loading()
    slot.mark_ready(engine(), loading_since=0.0)
    slot.mark_sleeping()
    slot.mark_loading()
    slot.mark_load_deferred()
    assert slot.state is SLEEPING and slot.engine is not None


def test_holding_requests_keep_a_model_from_eviction_and_count_as_use() -> None:
    clock = Clock()
    slot = make_slot(clock)
    slot.mark_loading()
    slot.mark_ready(engine(), loading_since=clock.now)
    assert slot.evictable
    slot.hold()
    slot.hold()
    clock.now += 5
    slot.let_go()
    assert (slot.holders, slot.last_used, slot.evictable) == (1, 1005.0, False)
    slot.let_go()
    assert slot.evictable
    with pytest.raises(AssertionError, match="let go more often than held"):
        slot.let_go()


def test_pinned_models_are_never_evictable() -> None:
    slot = make_slot(Clock(), pinned=True)
    slot.mark_loading()
    slot.mark_ready(engine(), loading_since=0.0)
    assert not slot.evictable and not slot.resident().evictable


# Every transition from every state: what the table in Slot's docstring says. ----------

ANY = frozenset(ModelState)
ALLOWED: dict[str, frozenset[ModelState]] = {
    "mark_loading": frozenset({NOT_LOADED, SLEEPING, FAILED, LOADING}),
    "mark_ready": frozenset({LOADING}),
    "mark_load_deferred": frozenset({LOADING}),
    "mark_sleeping": frozenset({READY}),
    "mark_failed": frozenset({LOADING, READY, SLEEPING, FAILED}),
    "mark_unloaded": frozenset({LOADING, READY, SLEEPING, FAILED}),
    "mark_unloaded(failed=True)": frozenset({LOADING, FAILED}),
}
CALLS: dict[str, Callable[[Slot], object]] = {
    "mark_loading": lambda slot: slot.mark_loading(),
    "mark_ready": lambda slot: slot.mark_ready(slot.engine or engine(), loading_since=0.0),
    "mark_load_deferred": lambda slot: slot.mark_load_deferred(),
    "mark_sleeping": lambda slot: slot.mark_sleeping(),
    "mark_failed": lambda slot: slot.mark_failed("failed"),
    "mark_unloaded": lambda slot: slot.mark_unloaded(),
    "mark_unloaded(failed=True)": lambda slot: slot.mark_unloaded(failed=True),
}


def slot_in(state: ModelState) -> Slot:
    """A slot put in ``state`` directly, with an engine wherever the state may have one."""
    slot = make_slot(Clock())
    slot.state = state
    slot.engine = None if state is NOT_LOADED else engine()
    return slot


@pytest.mark.parametrize("transition", sorted(CALLS))
@pytest.mark.parametrize("state", list(ModelState), ids=lambda s: s.value)
def test_every_transition_is_allowed_only_from_its_states(transition: str, state: ModelState) -> None:
    slot = slot_in(state)
    if state in ALLOWED[transition]:
        CALLS[transition](slot)
    else:
        with pytest.raises(AssertionError, match=f"from {state.value}"):
            CALLS[transition](slot)
        assert slot.state is state  # refused before anything changed


def test_a_model_is_not_readied_with_another_engine_than_the_one_it_wakes() -> None:
    slot = slot_in(SLEEPING)
    slot.mark_loading()
    with pytest.raises(AssertionError, match="another engine"):
        slot.mark_ready(engine(), loading_since=0.0)


def test_a_model_without_an_engine_cannot_sleep_or_be_unloaded() -> None:
    slot = slot_in(LOADING)
    slot.engine = None
    with pytest.raises(AssertionError, match="without an engine"):
        slot.mark_unloaded()
    slot.state = READY
    with pytest.raises(AssertionError, match="without an engine"):
        slot.mark_sleeping()
