"""The engine pool: which engine serves a model, loading and unloading engines."""

from server.pool.memory import discover_devices
from server.pool.pool import EnginePool, Lease, ModelState, ModelStatus

__all__ = ["EnginePool", "Lease", "ModelState", "ModelStatus", "discover_devices"]
