"""The engine pool: which engine serves a model, loading and unloading engines.

The service layer talks to engines only through what the pool hands out (a ``Lease`` on
an ``Engine``), so the engine types it needs are re-exported here.
"""

from server.engines import Engine, GenerationDelta, PreparedRequest, SamplingOptions
from server.pool.memory import discover_devices
from server.pool.pool import EnginePool, Lease
from server.pool.slot import ModelState, ModelStatus
from server.pool.starters import ENGINE_STARTERS, EngineStarter

__all__ = [
    "ENGINE_STARTERS",
    "Engine",
    "EnginePool",
    "EngineStarter",
    "GenerationDelta",
    "Lease",
    "ModelState",
    "ModelStatus",
    "PreparedRequest",
    "SamplingOptions",
    "discover_devices",
]
