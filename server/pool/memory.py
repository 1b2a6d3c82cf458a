"""What memory this machine offers engines, and what each model needs of it.

Devices are discovered without initialising CUDA in the server process (that would force
every later engine start onto the slower spawn path and hold a CUDA context): GPUs come
from ``nvidia-smi``, the host from ``/proc/meminfo``.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from pathlib import Path

from server.pool.placement import Device
from server.registry import ModelEntry
from server.registry.engine_kinds import DEFAULT_CPU_KV_CACHE_BYTES
from server.registry.memory import estimate_memory

logger = logging.getLogger(__name__)


def _gpu_memory_totals() -> list[int]:
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        logger.warning("nvidia-smi failed (%s); budgeting host memory only", exc)
        return []
    return [int(float(line)) << 20 for line in out.split() if line.strip()]


def _host_memory_total() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def discover_devices(budget: int | None, *, share: float = 0.9) -> list[Device]:
    """The devices engines run on, each with the bytes the pool may give them.

    ``budget`` (bytes per device) overrides the default, ``share`` of each device's memory.
    """
    totals = _gpu_memory_totals()
    if totals:
        return [Device(i, budget or int(total * share), total) for i, total in enumerate(totals)]
    total = _host_memory_total()
    return [Device(None, budget or int(total * share), total)]


def memory_need(entry: ModelEntry, weights_dir: str, device: Device) -> int:
    """Bytes ``entry`` takes on its devices: the registry's figure, or an estimate.

    The estimate is weights on disk plus the KV cache plus the engine's own processes
    (``server.registry.memory.estimate_memory``, the formula of the shipped figures). On
    a GPU with no KV-cache size the engine would take what it is given, so an unsized
    model is given whole devices.
    """
    if entry.memory is not None:
        return int(entry.memory)
    on_gpu = device.index is not None
    if on_gpu and entry.kv_cache_memory is None:
        return device.budget * entry.tensor_parallel_size
    kv = int(entry.kv_cache_memory) if entry.kv_cache_memory is not None else DEFAULT_CPU_KV_CACHE_BYTES
    return estimate_memory(_weights_bytes(Path(weights_dir)), kv)


def _weights_bytes(directory: Path) -> int:
    if not directory.is_dir():
        return 0
    return sum(p.stat().st_size for p in directory.iterdir() if p.suffix in {".safetensors", ".bin", ".pt"})
