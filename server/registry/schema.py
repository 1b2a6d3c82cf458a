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

# Bits a parameter takes in each dtype; auto counts as 16, the width vLLM serves a float32 or
# 16-bit checkpoint in, and the least any unquantized checkpoint takes.
DTYPE_BITS: dict[str, int] = {"auto": 16, "float32": 32, "float16": 16, "bfloat16": 16}

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
        description="What marks one image in a prompt, in the model's own spelling, e.g. `<image>`; `{n}` in it "
        "stands for the image's number from 1, for models that number their images (Phi-3-vision: "
        "`<|image_{n}|>`). A raw prompt without placeholders gets one per image before it, one a line.",
    )
    max_images: int = Field(
        default=1,
        ge=1,
        description="Images one request may send; more are refused with 400. Also vLLM's "
        "`limit_mm_per_prompt`, unless `engine_args` sets that.",
    )


class ModelEntry(BaseModel):
    """One model under one public ID: its weights, how to serve them, and facts about it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str | None = Field(
        default=None,
        min_length=1,
        description="Hugging Face repo ID, a local directory, or `builtin:NAME` for a model "
        "the project generates itself. Not set for a LoRA entry (`base` + `adapter`).",
    )
    base: str | None = Field(
        default=None,
        description="LoRA entries, instead of `source`: the registered model ID whose vLLM engine serves "
        "the adapter (one engine serves a base and all its adapters).",
    )
    adapter: str | None = Field(
        default=None, description="LoRA entries, with `base`: the adapter's hub repo ID or local directory."
    )
    revision: str | None = Field(
        default=None,
        description="Hub commit, branch or tag of the source (a LoRA entry's: of the adapter) to serve; unset: `main`.",
    )
    tokenizer: str | None = Field(
        default=None, description="Hub repo ID or local directory to take the tokenizer from; unset: the source."
    )
    engine: EngineKind = Field(
        default="vllm",
        description="What runs the model: `vllm`, or `transformers` for architectures vLLM does not run "
        "(T5-family encoder-decoders, and the decoder-only model types mpt, llama, gpt2, gpt_neox, "
        "bloom, falcon).",
    )
    dtype: Dtype = Field(
        default="auto",
        description="Precision of the weights and activations; `auto`: the engine's choice from the "
        "checkpoint (the transformers engine uses `float32` on CPUs).",
    )
    max_model_len: int | None = Field(
        default=None, ge=16, description="Context length served, prompt plus completion; unset: the model's config."
    )
    tensor_parallel_size: int = Field(
        default=1, ge=1, description="GPUs one engine spans; must divide the model's attention heads."
    )
    gpu_memory_utilization: float | None = Field(
        default=None,
        gt=0.0,
        le=1.0,
        description="vLLM's share of each GPU's memory; unset: derived from `memory` and the server's memory "
        "budget, so the shares of models on one GPU add up.",
    )
    kv_cache_memory: ByteSize | None = Field(
        default=None, description="KV-cache size, e.g. `512MiB`; required on CPU, optional on GPU."
    )
    trust_remote_code: bool = Field(
        default=False, description="Run the model code the repo ships, for architectures the engine lacks."
    )
    prompt_format: PromptFormat = Field(
        default="raw",
        description="`raw`: the prompt goes to the model as is, as the hosted API does; `chat`: it becomes a "
        "user message rendered with the model's chat template.",
    )
    default_max_tokens: int = Field(
        default=100, ge=1, description="Tokens to generate when a request omits `max_tokens` (100, as the hosted API)."
    )
    vision: VisionSettings | None = Field(
        default=None,
        description="Set for a vision model, which then accepts a request's images (vLLM engine, base "
        "models only); its keys are below.",
    )
    aliases: tuple[str, ...] = Field(default=(), description="Other IDs that resolve to this entry.")
    engine_args: dict[str, Any] = Field(
        default_factory=dict,
        description="Passed through to the engine: vLLM's `AsyncEngineArgs`, or the transformers engine's "
        "`max_batch_size`. Arguments the entry sets with its own keys (`model`, `dtype`, ...) are refused.",
    )
    description: str | None = Field(
        default=None, description="Free text for people reading the registry; the server does not use it."
    )
    # Facts about the model that `v4serve check` and `v4serve models` use without weights.
    architecture: str | None = Field(
        default=None,
        description="`architectures[0]` of the checkpoint's `config.json`; `check` tells from it whether the "
        "engine runs the model.",
    )
    attention_heads: int | None = Field(
        default=None,
        ge=1,
        description="`num_attention_heads` of `config.json`; `check` verifies that `tensor_parallel_size` divides it.",
    )
    parameters_b: float | None = Field(
        default=None,
        gt=0,
        description="Parameter count in billions; `check` warns when `memory` is below what the weights alone "
        "take (`parameters_b` x `weight_bits` / 8 bytes).",
    )
    weight_bits: float | None = Field(
        default=None,
        gt=0,
        le=32,
        description="Bits one parameter takes in memory on average, for a quantized checkpoint: its size in "
        "bits over its parameter count. Unset: `dtype`'s width, 16 for `auto`.",
    )
    memory: ByteSize | None = Field(
        default=None,
        description="Memory the engine needs in all, weights + KV cache + the engine processes' overhead, e.g. "
        "`40GiB`; the engine pool places and evicts models by it. The shipped figures are "
        "`server/registry/memory.py`'s formula (`scripts/gen_memory.py`). Unset: the same formula with the "
        "weights on disk, and on a GPU without `kv_cache_memory`, whole devices.",
    )
    gated: bool = Field(
        default=False,
        description="The hub repo needs an accepted licence and `HF_TOKEN`; `pull` names such repos up front "
        "when `HF_TOKEN` is unset.",
    )
    # How the engine pool treats the model (see server/pool).
    pinned: bool = Field(default=False, description="Load at start-up and never unload.")
    keep_alive: float | None = Field(
        default=None, gt=0, description="Seconds unused before unloading; unset: the server's `keep_alive` setting."
    )
    max_running: int = Field(default=256, ge=1, description="Requests admitted into the engine at once.")
    max_queued: int = Field(
        default=512,
        ge=0,
        description="Requests waiting, in arrival order, beyond `max_running`; past that, 429 with `Retry-After`.",
    )

    @property
    def parameter_bits(self) -> float:
        """Bits one parameter takes in memory: weight_bits, or the dtype's width."""
        return self.weight_bits or DTYPE_BITS[self.dtype]

    def weight_bytes(self) -> int | None:
        """The least memory the weights take (parameters_b at parameter_bits); None if unknown."""
        if self.parameters_b is None:
            return None
        return int(self.parameters_b * 1e9 * self.parameter_bits / 8)

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

    models: dict[str, ModelEntry] = Field(
        default_factory=dict,
        description="The entries, each under its public model ID; an operator file's entry replaces the "
        "entry of the same ID in the files before it whole.",
    )
    aliases: dict[str, str] = Field(
        default_factory=dict,
        description="Extra names for registered models, e.g. `gpt-4: llama-3-1-70b-instruct`, so "
        "code written for the hosted API runs unchanged.",
    )
    hosted_vendor_ids: list[str] = Field(
        default_factory=list,
        description="IDs of the hosted API's closed models; a request for one that is not "
        "aliased is told the model has no open weights and how to alias it.",
    )
