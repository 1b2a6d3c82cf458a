"""Engines: the code that runs a model (vLLM, and transformers for what vLLM does not run)."""

from server.engines.base import (
    AdapterRef,
    Engine,
    EngineStats,
    GenerationDelta,
    PreparedRequest,
    SamplingOptions,
    TokenLogprob,
    TopLogprob,
)

__all__ = [
    "AdapterRef",
    "Engine",
    "EngineStats",
    "GenerationDelta",
    "PreparedRequest",
    "SamplingOptions",
    "TokenLogprob",
    "TopLogprob",
]
