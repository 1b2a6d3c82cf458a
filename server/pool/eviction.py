"""Which loaded model gives up its memory first when another needs room.

A pure decision over snapshots of the models, so it is tested without engines, beside
``DevicePlanner``: the pool asks the planner for a place and, while there is none,
evicts (puts to sleep or unloads) the model ``pick_victim`` names, then asks again.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Resident:
    """What eviction needs to know of one engine-backed model."""

    model_id: str
    ready: bool  # loaded and awake: not loading, asleep, failed or unloaded
    pinned: bool
    holders: int  # requests holding or waiting for its engine
    last_used: float  # by the pool's clock

    @property
    def evictable(self) -> bool:
        """Whether its memory may be taken: ready, serving no request, and not pinned.

        Keep-alive uses the same test: a model is put away once it has been evictable
        for its keep-alive.
        """
        return self.ready and self.holders == 0 and not self.pinned


def pick_victim(residents: Iterable[Resident], *, making_room_for: str) -> str | None:
    """The model to evict first to make room for ``making_room_for``: of the others that
    are evictable, the least recently used (the first listed, on a tie). ``None`` when
    none is: every other model is pinned, serving, or holds no memory to give."""
    candidates = (r for r in residents if r.model_id != making_room_for and r.evictable)
    victim = min(candidates, key=lambda r: r.last_used, default=None)
    return None if victim is None else victim.model_id
