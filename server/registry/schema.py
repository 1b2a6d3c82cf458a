"""What a registry entry may say about a model.

Like Ray Serve LLM's ``LLMConfig``, an entry keeps the public model ID (its key in the
file) apart from the weight source and from the engine arguments, so an operator can
serve any checkpoint under any ID. Unknown keys are errors: a typo such as ``dtpye``
must fail start-up rather than be silently ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ByteSize, field_validator

Dtype = Literal["auto", "float32", "float16", "bfloat16"]
PromptFormat = Literal["raw", "chat"]
EngineKind = Literal["vllm"]

# Engine arguments the registry sets through its own keys; passing them again through
# ``engine_args`` would make two places disagree about one setting.
RESERVED_ENGINE_ARGS = frozenset(
    {
        "model",
        "tokenizer",
        "revision",
        "dtype",
        "max_model_len",
        "tensor_parallel_size",
        "gpu_memory_utilization",
        "kv_cache_memory_bytes",
        "trust_remote_code",
    }
)


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field(
        min_length=1,
        description="Hugging Face repo ID, a local directory, or builtin:NAME for a model "
        "the project generates itself.",
    )
    revision: str | None = None
    tokenizer: str | None = None
    engine: EngineKind = "vllm"
    dtype: Dtype = "auto"
    max_model_len: int | None = Field(default=None, ge=16)
    tensor_parallel_size: int = Field(default=1, ge=1)
    gpu_memory_utilization: float | None = Field(default=None, gt=0.0, le=1.0)
    kv_cache_memory: ByteSize | None = Field(
        default=None, description="KV-cache size, e.g. 512MiB; required on CPU, optional on GPU."
    )
    trust_remote_code: bool = False
    prompt_format: PromptFormat = "raw"
    default_max_tokens: int = Field(default=100, ge=1)
    aliases: tuple[str, ...] = ()
    engine_args: dict[str, Any] = Field(default_factory=dict)
    description: str | None = None

    @field_validator("engine_args")
    @classmethod
    def _no_reserved_engine_args(cls, value: dict[str, Any]) -> dict[str, Any]:
        clash = sorted(RESERVED_ENGINE_ARGS.intersection(value))
        if clash:
            raise ValueError(
                f"{', '.join(clash)} must be set with the entry's own key, not in engine_args"
            )
        return value


class RegistryFile(BaseModel):
    """The shape of one registry YAML file."""

    model_config = ConfigDict(extra="forbid")

    models: dict[str, ModelEntry] = Field(default_factory=dict)
