"""One tiny model per architecture the shipped registry names, as data.

Each registered repo's architecture, and each config variant that takes another code
path in an engine (Falcon-7B's and Falcon-40B's decoder layouts, Mistral's sliding
window, Mixtral's experts, Llama 3.1's rope scaling, Phi-3's fused projections,
GPT-2's learned positions, gpt-oss's attention sinks, Qwen2-VL's M-RoPE), is one row
here: the transformers config class of the real checkpoint with its ``model_type`` and
structural flags as in the registered repos' ``config.json``, and every dimension shrunk
(2 layers, heads of 64, the shared 1,024-token tokenizer). ``server/weights/tiny.py``
builds each row as a ``builtin:`` model; tests/test_architectures.py serves each through
the engine its registry entries use and compares it with transformers.

This module is pure data (no torch, no transformers), so the registry tooling and the
docs generator can read it cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

# Dimensions every row shares unless it says otherwise: 2 layers of width 128, heads of
# 64 (vLLM's CPU attention refuses a head size of 16 or 32), token IDs of the shared
# tokenizer (<s> 0, </s> 1, <pad> 3).
VOCAB = 1024
TOKEN_IDS: dict[str, int] = {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 3}
# Wider than the usual 0.02 so that greedy decoding wanders over the vocabulary instead of
# repeating one token: a comparison of two engines on repeated tokens proves little.
_WIDE_INIT = 0.2
_DECODER: dict[str, Any] = {
    "vocab_size": VOCAB,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 64,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
    "initializer_range": _WIDE_INIT,
    **TOKEN_IDS,
}

Vision = Literal["llava", "llava_next", "qwen2_vl"]


@dataclass(frozen=True)
class ArchitectureSpec:
    """One tiny model standing for the registered checkpoints of one architecture variant."""

    builtin: str  # the builtin model name: `source: builtin:<builtin>`
    architecture: str  # architectures[0] of the registered repos' config.json
    variant: str  # what of the real config's structure it reproduces
    registered: tuple[str, ...]  # shipped registry IDs it stands for
    config_class: str = ""  # transformers config class; "" where no tiny model can be made
    config: dict[str, Any] = field(default_factory=dict)
    vision: Vision | None = None
    # Modules a LoRA adapter for this base targets (the registered adapters' kind), when
    # a LoRA entry of the shipped registry is served on one of ``registered``.
    lora_targets: tuple[str, ...] = ()
    # Why no tiny model of this architecture can be generated here, when none can.
    not_generated: str | None = None

    @property
    def model_class(self) -> str:
        return self.architecture

    @property
    def adapter(self) -> str | None:
        """The builtin name of this base's tiny LoRA adapter, if it has one."""
        return f"{self.builtin}-lora" if self.lora_targets else None


ARCHITECTURES: tuple[ArchitectureSpec, ...] = (
    # Built by tiny.py's own functions (the first builtins); listed so the table is whole.
    ArchitectureSpec(
        "tiny-llama",
        "LlamaForCausalLM",
        "Llama 1/2, CodeLlama: rotary positions, grouped-query attention",
        ("llama-7b", "llama-2-7b", "llama-2-70b", "codellama-7b", "codellama-34b", "llama-3-8b-instruct"),
        lora_targets=("q_proj", "v_proj", "o_proj", "down_proj"),
    ),
    ArchitectureSpec(
        "tiny-llama3",
        "LlamaForCausalLM",
        "Llama 3.1/3.2/3.3: rope_scaling of type llama3 (long-context frequency bands)",
        ("llama-3-1-8b-instruct", "llama-3-1-70b-instruct", "llama-3-2-1b-instruct", "llama-3-3-70b-instruct"),
        "LlamaConfig",
        {
            **_DECODER,
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 256,
            },
        },
    ),
    ArchitectureSpec(
        "tiny-falcon-7b",
        "FalconForCausalLM",
        "Falcon-7B: multi-query attention (one KV head), parallel attention and MLP, old decoder layout",
        ("falcon-7b", "falcon-7b-instruct"),
        "FalconConfig",
        {
            "vocab_size": VOCAB,
            "hidden_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "multi_query": True,
            "parallel_attn": True,
            "new_decoder_architecture": False,
            "alibi": False,
            "bias": False,
            "max_position_embeddings": 2048,
            "initializer_range": _WIDE_INIT,
            **TOKEN_IDS,
        },
    ),
    ArchitectureSpec(
        "tiny-falcon-40b",
        "FalconForCausalLM",
        "Falcon-40B: new decoder layout (two layer norms, grouped KV heads)",
        ("falcon-40b", "falcon-40b-instruct"),
        "FalconConfig",
        {
            "vocab_size": VOCAB,
            "hidden_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_kv_heads": 2,
            "new_decoder_architecture": True,
            "multi_query": True,
            "parallel_attn": True,
            "alibi": False,
            "bias": False,
            "max_position_embeddings": 2048,
            "initializer_range": _WIDE_INIT,
            **TOKEN_IDS,
        },
    ),
    ArchitectureSpec(
        "tiny-mistral",
        "MistralForCausalLM",
        "Mistral-7B v0.1, Zephyr: sliding-window attention (4096 there, 32 here, so prompts cross it)",
        ("mistral-7b", "mistral-7b-instruct", "zephyr-7b-alpha", "zephyr-7b-beta"),
        "MistralConfig",
        {**_DECODER, "sliding_window": 32},
        lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    ),
    ArchitectureSpec(
        "tiny-mixtral",
        "MixtralForCausalLM",
        "Mixtral: sparse mixture of experts (8 experts, top 2 there; 4, top 2 here)",
        ("mixtral-8x7b", "mixtral-8x7b-instruct", "mixtral-8x22b-instruct"),
        "MixtralConfig",
        {**_DECODER, "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None},
    ),
    ArchitectureSpec(
        "tiny-phi3",
        "Phi3ForCausalLM",
        "Phi-3-mini-4k: fused qkv_proj and gate_up_proj, sliding window (2047 there, 48 here)",
        ("phi-3-mini-4k-instruct",),
        "Phi3Config",
        {**_DECODER, "num_key_value_heads": 2, "sliding_window": 48},
        lora_targets=("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
    ),
    ArchitectureSpec(
        "tiny-phi3-longrope",
        "Phi3ForCausalLM",
        "Phi-3 128k (Phi-3-vision's language model): longrope scaling with short and long factors",
        ("phi-3-vision-128k-instruct",),
        "Phi3Config",
        {
            **_DECODER,
            "num_key_value_heads": 2,
            # 4096 there (of 131072); 64 here, so the long prompt switches to the long factors.
            # Phi3Config keeps it beside rope_parameters, and its value wins.
            "original_max_position_embeddings": 64,
            "rope_parameters": {
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "short_factor": [1.0 + i / 64 for i in range(32)],
                "long_factor": [1.0 + i / 8 for i in range(32)],
                "original_max_position_embeddings": 64,
            },
        },
    ),
    ArchitectureSpec(
        "tiny-gpt2",
        "GPT2LMHeadModel",
        "LLM-jp v1.0: GPT-2 with learned absolute positions, biases, tied output layer",
        ("llm-jp-13b-instruct-full", "llm-jp-13b-instruct-full-dolly"),
        "GPT2Config",
        {
            "vocab_size": VOCAB,
            "n_embd": 128,
            "n_layer": 2,
            "n_head": 2,
            "n_positions": 2048,
            "initializer_range": _WIDE_INIT,
            **TOKEN_IDS,
        },
    ),
    ArchitectureSpec(
        "tiny-gpt-oss",
        "GptOssForCausalLM",
        "gpt-oss: attention sinks, alternating sliding (128 there, 32 here) and full layers, "
        "mixture of experts, yarn rope (unquantized here: the real experts are MXFP4)",
        ("gpt-oss-20b", "gpt-oss-120b"),
        "GptOssConfig",
        {
            **_DECODER,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 128,
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "sliding_window": 32,
            "layer_types": ["sliding_attention", "full_attention"],
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 150000.0,
                "factor": 8.0,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "truncate": False,
                "original_max_position_embeddings": 256,
            },
        },
    ),
    ArchitectureSpec(
        "tiny-mpt",
        "MptForCausalLM",
        "MPT: ALiBi attention biases, no biases, tied output layer (transformers engine)",
        ("mpt-7b", "mpt-7b-instruct"),
    ),
    ArchitectureSpec(
        "tiny-t5",
        "T5ForConditionalGeneration",
        "Flan-T5 (v1.1): encoder-decoder, relative position buckets, gated GELU (transformers engine)",
        ("flan-t5-xxl",),
    ),
    ArchitectureSpec(
        "tiny-llava",
        "LlavaForConditionalGeneration",
        "LLaVA-1.5: CLIP vision tower, MLP projector, Llama language model",
        ("llava-1.5-7b", "llava-1.5-13b"),
        vision="llava",
    ),
    ArchitectureSpec(
        "tiny-llava-next",
        "LlavaNextForConditionalGeneration",
        "LLaVA-NeXT (1.6) on Mistral: images tiled by grid pinpoints, newline embeddings",
        ("llava-v1.6-mistral-7b",),
        "LlavaNextConfig",
        {"text_config": {**_DECODER, "model_type": "mistral", "sliding_window": None}},
        vision="llava_next",
    ),
    ArchitectureSpec(
        "tiny-qwen2-vl",
        "Qwen2VLForConditionalGeneration",
        "Qwen2-VL: M-RoPE (sections for time, height, width), dynamic-resolution vision tower",
        ("qwen2-vl-7b-instruct",),
        "Qwen2VLConfig",
        {
            "text_config": {
                **_DECODER,
                "model_type": "qwen2_vl_text",
                "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [8, 12, 12]},
            },
            "vision_config": {
                "depth": 2,
                "embed_dim": 128,
                "hidden_size": 128,
                "num_heads": 2,
                "mlp_ratio": 2,
                "patch_size": 14,
                "spatial_merge_size": 2,
                "temporal_patch_size": 2,
                "initializer_range": _WIDE_INIT,
            },
        },
        vision="qwen2_vl",
    ),
    ArchitectureSpec(
        "",
        "Phi3VForCausalLM",
        "Phi-3-vision",
        ("phi-3-vision-128k-instruct",),
        not_generated=(
            "transformers has no Phi3V classes: the model and its image processor are the repo's own code "
            "(trust_remote_code), which no machine without the hub can fetch; its language model (Phi-3 "
            "with longrope) is tiny-phi3-longrope"
        ),
    ),
)

# The rows tiny.py builds from the table (the others have builders of their own, or none).
GENERATED = tuple(spec for spec in ARCHITECTURES if spec.config_class)


def spec_of(builtin: str) -> ArchitectureSpec:
    """The row of builtin model ``builtin``."""
    for spec in ARCHITECTURES:
        if spec.builtin == builtin:
            return spec
    raise KeyError(builtin)
