"""How the pool starts each kind of engine (the registry's ``engine:`` key).

Engines are imported only when the first of their kind starts: vLLM's import alone
takes seconds, and a server of transformers models never needs it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from server.engines.base import AdapterRef, Engine, LaunchOptions
from server.registry import ModelEntry
from server.telemetry import Telemetry

# (model ID, entry, weights, LoRA adapters on the model, launch options) -> a ready engine.
EngineStarter = Callable[[str, ModelEntry, str, Sequence[AdapterRef], LaunchOptions], Awaitable[Engine]]


def engine_starters(telemetry: Telemetry | None = None) -> dict[str, EngineStarter]:
    """The starter of each kind of engine; their engines report their own statistics
    (batch sizes, waiting requests, vLLM's KV cache and spans) to ``telemetry``."""

    def start_vllm(
        model_id: str, entry: ModelEntry, weights: str, adapters: Sequence[AdapterRef], launch: LaunchOptions
    ) -> Awaitable[Engine]:
        from server.engines.vllm_engine import VLLMEngine

        if telemetry is None:
            return VLLMEngine.start(model_id, entry, weights, adapters, launch)
        metrics, traces_endpoint = telemetry.metrics.engine(model_id), telemetry.tracing.traces_url
        return VLLMEngine.start(
            model_id, entry, weights, adapters, launch, metrics=metrics, traces_endpoint=traces_endpoint
        )

    def start_transformers(
        model_id: str, entry: ModelEntry, weights: str, adapters: Sequence[AdapterRef], launch: LaunchOptions
    ) -> Awaitable[Engine]:
        from server.engines.transformers_engine import TransformersEngine

        metrics = None if telemetry is None else telemetry.metrics.engine(model_id)
        return TransformersEngine.start(model_id, entry, weights, adapters, launch, metrics=metrics)

    return {"vllm": start_vllm, "transformers": start_transformers}


# The starters of engines that report nowhere (a Ray replica's, a batch host's).
ENGINE_STARTERS: dict[str, EngineStarter] = engine_starters()
