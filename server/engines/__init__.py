"""Engines: the code that runs a model (vLLM here; more kinds plug in beside it)."""

from server.engines.base import (
    Engine,
    EngineStats,
    GenerationDelta,
    PreparedRequest,
    SamplingOptions,
)

__all__ = ["Engine", "EngineStats", "GenerationDelta", "PreparedRequest", "SamplingOptions"]
