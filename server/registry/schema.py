"""What a registry entry may say about a model.

Like Ray Serve LLM's ``LLMConfig``, an entry keeps the public model ID (its key in the
file) apart from the weight source and from the engine arguments, so an operator can
serve any checkpoint under any ID. Unknown keys are errors: a typo such as ``dtpye``
must fail start-up rather than be silently ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ByteSize, ConfigDict, Field, ValidationInfo, field_validator, model_validator

Dtype = Literal["auto", "float32", "float16", "bfloat16"]
PromptFormat = Literal["raw", "chat"]
EngineKind = Literal["vllm", "transformers"]

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


class VisionSettings(BaseModel):
    """How a vision model takes a request's images.

    A raw prompt must mark where each image goes, in the model's own spelling: vLLM
    replaces each mark with the image's feature tokens and refuses a prompt whose marks
    do not match its images.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    placeholder: str = Field(
        min_length=1,
        description="what marks one image in a prompt, e.g. <image>; {n} in it stands for the "
        "image's number from 1, for models that number their images (Phi-3-vision: <|image_{n}|>)",
    )
    max_images: int = Field(default=1, ge=1, description="images one request may send; also vLLM's limit_mm_per_prompt")


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str | None = Field(
        default=None,
        min_length=1,
        description="Hugging Face repo ID, a local directory, or builtin:NAME for a model "
        "the project generates itself. Not set for a LoRA entry (base + adapter).",
    )
    base: str | None = Field(
        default=None, description="LoRA entries: the registered model ID whose engine serves the adapter."
    )
    adapter: str | None = Field(default=None, description="LoRA entries: the adapter's hub repo ID or local directory.")
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
    vision: VisionSettings | None = Field(
        default=None, description="set for a vision model, which then accepts a request's images"
    )
    aliases: tuple[str, ...] = ()
    engine_args: dict[str, Any] = Field(default_factory=dict)
    description: str | None = None
    # Facts about the model that `v4serve check` and `v4serve models` use without weights.
    architecture: str | None = Field(default=None, description="architectures[0] of config.json")
    attention_heads: int | None = Field(default=None, ge=1)
    parameters_b: float | None = Field(default=None, gt=0, description="parameter count, billions")
    memory: ByteSize | None = Field(default=None, description="memory the engine needs in all: weights plus KV cache")
    gated: bool = Field(default=False, description="the hub repo needs an accepted licence and HF_TOKEN")
    # How the engine pool treats the model (see server/pool).
    pinned: bool = Field(default=False, description="load at start-up and never unload")
    keep_alive: float | None = Field(
        default=None, gt=0, description="seconds unused before unloading; default: the server's --keep-alive"
    )
    max_running: int = Field(default=256, ge=1, description="requests admitted into the engine at once")
    max_queued: int = Field(default=512, ge=0, description="requests waiting beyond max_running; then 429")

    @model_validator(mode="after")
    def _source_or_adapter(self) -> ModelEntry:
        if self.base is not None or self.adapter is not None:
            if self.base is None or self.adapter is None:
                raise ValueError("a LoRA entry needs both 'base' and 'adapter'")
            if self.source is not None:
                raise ValueError("a LoRA entry takes 'base' and 'adapter', not 'source'")
        elif self.source is None:
            raise ValueError("an entry needs 'source' (or 'base' and 'adapter' for a LoRA adapter)")
        return self

    @field_validator("vision")
    @classmethod
    def _vision_on_vllm_models(cls, value: VisionSettings | None, info: ValidationInfo) -> VisionSettings | None:
        # Images reach the model through vLLM's multimodal processor; the transformers
        # engine has none, and adapters are served for text only.
        if value is not None and info.data.get("base") is not None:
            raise ValueError("LoRA entries take no images; set it on a base model's entry")
        if value is not None and info.data.get("engine") != "vllm":
            raise ValueError("it needs engine: vllm; the transformers engine serves no vision models")
        return value

    @property
    def is_adapter(self) -> bool:
        return self.base is not None

    @field_validator("engine_args")
    @classmethod
    def _no_reserved_engine_args(cls, value: dict[str, Any]) -> dict[str, Any]:
        clash = sorted(RESERVED_ENGINE_ARGS.intersection(value))
        if clash:
            raise ValueError(f"{', '.join(clash)} must be set with the entry's own key, not in engine_args")
        return value


class RegistryFile(BaseModel):
    """The shape of one registry YAML file."""

    model_config = ConfigDict(extra="forbid")

    models: dict[str, ModelEntry] = Field(default_factory=dict)
    aliases: dict[str, str] = Field(
        default_factory=dict,
        description="Extra names for registered models, e.g. gpt-4: llama-3-1-70b-instruct, so "
        "code written for the hosted API runs unchanged.",
    )
    hosted_vendor_ids: list[str] = Field(
        default_factory=list,
        description="IDs of the hosted API's closed models; a request for one that is not "
        "aliased is told the model has no open weights and how to alias it.",
    )
