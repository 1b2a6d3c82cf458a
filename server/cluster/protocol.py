"""What the ingress and the replicas tell each other, beyond engine types.

Plain frozen dataclasses: Ray pickles them between processes, and neither side needs
the other's classes to read them.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class ModelPlacement:
    """One model as one replica holds it."""

    state: str  # server.pool.ModelState's value on that replica
    running: int
    queued: int
    engine_starts: int  # engines of this model the replica has started, ever
    memory: int | None
    devices: str | None
    error: str | None


@dataclass(frozen=True, slots=True)
class ReplicaInfo:
    """A replica's answer to ``info``: where it runs, and what it holds."""

    name: str
    pid: int
    node: str
    budget_bytes: int  # what its pool may give engines, over all its devices
    used_bytes: int  # what the models placed there take now
    running: int
    queued: int
    models: dict[str, ModelPlacement] = field(default_factory=dict)

    @property
    def free_bytes(self) -> int:
        return self.budget_bytes - self.used_bytes

    @property
    def load(self) -> int:
        """Requests on the replica, running or waiting."""
        return self.running + self.queued

    def holds(self, model_id: str) -> bool:
        """Whether the model is loaded there, or on its way."""
        placement = self.models.get(model_id)
        return placement is not None and placement.state in {"ready", "loading", "sleeping"}


@dataclass(frozen=True, slots=True)
class EngineFacts:
    """What the ingress's handle needs of a model's engine without asking each time."""

    max_model_len: int
    has_chat_template: bool
