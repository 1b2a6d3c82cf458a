"""KV-cache shapes of the shipped registry's checkpoints, keyed by their hub repo.

The registry states each model's parameter count and dtype, but not what a token costs
in its KV cache; these are the facts of each repo's ``config.json`` that decide it
(``num_hidden_layers``, ``num_key_value_heads`` or its equivalent, head size,
``sliding_window``), for ``server.registry.memory.entry_memory``. An entry whose source
is not here (an operator's own checkpoint) states ``memory`` itself or is estimated by
the pool from its files.
"""

from __future__ import annotations

from server.registry.memory import KVShape

# Multi-head attention of width 4096 (LLaMA 1/2 7B, CodeLlama 7B, MPT-7B, LLaVA-1.5 7B).
_MHA_7B = KVShape(32, 32, 128)
_MHA_13B = KVShape(40, 40, 128)  # LLaMA 2 13B, CodeLlama 13B, LLaVA-1.5 13B, LLM-jp 13B
_GQA_8B = KVShape(32, 8, 128)  # Llama 3/3.1 8B and its fine-tunes
_GQA_70B = KVShape(80, 8, 128)  # Llama 2/3/3.1/3.3 70B
# Mistral 7B v0.1 and the Zephyrs built on it: every layer attends over 4096 tokens.
_MISTRAL_V01 = KVShape(32, 8, 128, window=4096, windowed_layers=32)
_PHI3_MINI = KVShape(32, 32, 96)  # hidden 3072, 32 heads, no grouping

KV_SHAPES: dict[str, KVShape] = {
    "huggyllama/llama-7b": _MHA_7B,
    "meta-llama/Llama-2-7b-hf": _MHA_7B,
    "meta-llama/Llama-2-7b-chat-hf": _MHA_7B,
    "meta-llama/Llama-2-13b-hf": _MHA_13B,
    "meta-llama/Llama-2-13b-chat-hf": _MHA_13B,
    "meta-llama/Llama-2-70b-hf": _GQA_70B,
    "meta-llama/Llama-2-70b-chat-hf": _GQA_70B,
    "meta-llama/Meta-Llama-3-8B": _GQA_8B,
    "meta-llama/Meta-Llama-3-8B-Instruct": _GQA_8B,
    "meta-llama/Meta-Llama-3-70B-Instruct": _GQA_70B,
    "meta-llama/Llama-3.1-8B-Instruct": _GQA_8B,
    "meta-llama/Llama-3.1-70B-Instruct": _GQA_70B,
    "ScaleAI/mhj-llama3-8b-rmu": _GQA_8B,
    "GraySwanAI/Llama-3-8B-Instruct-RR": _GQA_8B,
    "LLM-LAT/robust-llama3-8b-instruct": _GQA_8B,
    # Falcon-7B: multi-query, one KV head of 64 (hidden 4544 over 71 heads).
    "tiiuae/falcon-7b": KVShape(32, 1, 64),
    "tiiuae/falcon-7b-instruct": KVShape(32, 1, 64),
    # Falcon-40B: 8 KV groups of 64.
    "tiiuae/falcon-40b": KVShape(60, 8, 64),
    "tiiuae/falcon-40b-instruct": KVShape(60, 8, 64),
    "mosaicml/mpt-7b": _MHA_7B,
    "mosaicml/mpt-7b-instruct": _MHA_7B,
    # T5-XXL's decoder: 24 layers, each caching its own keys and values and the encoder's
    # (cross-attention), 64 heads of 64; counted as 48 cached layers.
    "google/flan-t5-xxl": KVShape(48, 64, 64),
    "mistralai/Mistral-7B-v0.1": _MISTRAL_V01,
    "mistralai/Mistral-7B-Instruct-v0.1": _MISTRAL_V01,
    "mistralai/Mixtral-8x7B-v0.1": KVShape(32, 8, 128),
    "mistralai/Mixtral-8x7B-Instruct-v0.1": KVShape(32, 8, 128),
    "mistralai/Mixtral-8x22B-Instruct-v0.1": KVShape(56, 8, 128),
    "llm-jp/llm-jp-13b-instruct-full-jaster-v1.0": _MHA_13B,
    "llm-jp/llm-jp-13b-instruct-full-dolly-oasst-v1.0": _MHA_13B,
    "HuggingFaceH4/zephyr-7b-alpha": _MISTRAL_V01,
    "HuggingFaceH4/zephyr-7b-beta": _MISTRAL_V01,
    "codellama/CodeLlama-7b-hf": _MHA_7B,
    "codellama/CodeLlama-7b-Instruct-hf": _MHA_7B,
    "codellama/CodeLlama-13b-hf": _MHA_13B,
    "codellama/CodeLlama-13b-Instruct-hf": _MHA_13B,
    "codellama/CodeLlama-34b-hf": KVShape(48, 8, 128),
    "codellama/CodeLlama-34b-Instruct-hf": KVShape(48, 8, 128),
    "microsoft/Phi-3-mini-4k-instruct": _PHI3_MINI,
    "cognitivecomputations/dolphin-2.9-llama3-8b": _GQA_8B,
    "cognitivecomputations/dolphin-2.9-llama3-70b": _GQA_70B,
    "meta-llama/Llama-3.2-1B-Instruct": KVShape(16, 8, 64),
    "meta-llama/Llama-3.2-3B-Instruct": KVShape(28, 8, 128),
    "meta-llama/Llama-3.3-70B-Instruct": _GQA_70B,
    # gpt-oss: 8 KV heads of 64; every other layer attends over a 128-token window.
    "openai/gpt-oss-20b": KVShape(24, 8, 64, window=128, windowed_layers=12),
    "openai/gpt-oss-120b": KVShape(36, 8, 64, window=128, windowed_layers=18),
    "llava-hf/llava-1.5-7b-hf": _MHA_7B,
    "llava-hf/llava-1.5-13b-hf": _MHA_13B,
    # LLaVA-NeXT's language model is Mistral-7B-Instruct v0.2: no sliding window.
    "llava-hf/llava-v1.6-mistral-7b-hf": KVShape(32, 8, 128),
    "microsoft/Phi-3-vision-128k-instruct": _PHI3_MINI,
    "Qwen/Qwen2-VL-7B-Instruct": KVShape(28, 4, 128),
}
