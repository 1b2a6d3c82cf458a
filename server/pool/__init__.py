"""The engine pool: which engine serves a model, loading and unloading engines."""

from server.pool.pool import EnginePool, ModelState, ModelStatus

__all__ = ["EnginePool", "ModelState", "ModelStatus"]
