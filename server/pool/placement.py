"""Which devices an engine runs on, and whether it fits beside the engines already there.

Memory is budgeted in absolute bytes per device, not as fractions: vLLM reads
``gpu_memory_utilization`` as a share of the whole device checked against what is free,
so two engines with fractions chosen independently overrun it (the second model's OOM
is the most common multi-model failure). Here each engine gets devices with room for its
declared need, and its share is derived from that need, so shares on a device add up.
A CPU-only machine is one device whose memory is RAM.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Device:
    """A GPU by its index, or the host (index ``None``), with the bytes budgeted for engines."""

    index: int | None
    budget: int
    total: int


@dataclass(frozen=True)
class Placement:
    devices: tuple[Device, ...]
    bytes_per_device: int

    @property
    def visible_devices(self) -> str | None:
        """``CUDA_VISIBLE_DEVICES`` for the engine's processes; ``None`` on the host."""
        indices = [d.index for d in self.devices if d.index is not None]
        return ",".join(map(str, indices)) if indices else None

    @property
    def memory_share(self) -> float:
        """The engine's ``gpu_memory_utilization`` on each of its devices."""
        return min(1.0, self.bytes_per_device / min(d.total for d in self.devices))


class DevicePlanner:
    def __init__(self, devices: list[Device]):
        if not devices:
            raise ValueError("at least one device is needed")
        self.devices = devices
        self._used: dict[int | None, dict[str, int]] = {d.index: {} for d in devices}

    def free(self, device: Device) -> int:
        return device.budget - sum(self._used[device.index].values())

    def place(
        self, model_id: str, need: int, tensor_parallel_size: int = 1, *, on: tuple[Device, ...] | None = None
    ) -> Placement | None:
        """Devices for ``model_id``, or ``None`` when it does not fit beside what is loaded.

        Of the devices with room, the fullest are chosen first, so models pack together
        and whole devices stay free for large models that need them. ``on`` restricts the
        choice to given devices: a sleeping engine wakes where its processes live.
        """
        if tensor_parallel_size > len(self.devices):
            return None
        per_device = -(-need // tensor_parallel_size)
        candidates = sorted(
            (d for d in (on or self.devices) if self.free(d) >= per_device),
            key=lambda d: (self.free(d), d.index or 0),
        )
        if len(candidates) < tensor_parallel_size:
            return None
        chosen = tuple(sorted(candidates[:tensor_parallel_size], key=lambda d: d.index or 0))
        for device in chosen:
            self._used[device.index][model_id] = per_device
        return Placement(chosen, per_device)

    def release(self, model_id: str) -> None:
        for used in self._used.values():
            used.pop(model_id, None)

    def fits_at_all(self, need: int, tensor_parallel_size: int = 1) -> bool:
        """Whether the model could fit once everything else was unloaded."""
        per_device = -(-need // tensor_parallel_size)
        return sum(1 for d in self.devices if d.budget >= per_device) >= tensor_parallel_size
