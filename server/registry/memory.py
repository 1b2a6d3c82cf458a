"""How much memory a model's engine needs: one formula for the registry and the pool.

    memory = weights + KV bytes a sequence x concurrency + engine overhead

- **weights**: ``parameters_b`` x ``weight_bits`` (or the dtype's width) / 8, or, for a
  checkpoint on this machine, its size on disk;
- **KV bytes a sequence**: 2 (keys and values) x layers x KV heads x head size x the
  dtype's bytes, for each token of ``max_model_len``; a layer with a sliding window
  holds only the window's tokens (Mistral v0.1, gpt-oss's windowed half);
- **concurrency**: full-length sequences the cache must hold at once (``CONCURRENCY``);
- **engine overhead**: ``ENGINE_OVERHEAD_BYTES``, what the engine's processes hold
  besides weights and cache.

The shipped registry's ``memory`` figures are this function's output, rounded up to
whole GiB (``scripts/gen_memory.py`` rewrites them; tests/test_memory_estimates.py checks
them), and the pool's estimate for an entry without ``memory`` is the same formula with
the checkpoint's size on disk and the entry's KV cache size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from server.registry.schema import DTYPE_BITS, ModelEntry

GiB = 1 << 30
# What an engine's processes hold besides weights and KV cache. Measured here for vLLM
# 0.32 on CPU (tests/test_architectures.py): EngineCore and worker of a tiny model hold
# 1.65-1.75 GiB between them (proportional set size). On a GPU the same allowance stands
# for the CUDA context, the activation peak and CUDA graphs (not measured here).
ENGINE_OVERHEAD_BYTES = 2 * GiB
# Full-length sequences the KV cache of a shipped entry holds at once: enough for a
# second request to run beside one that fills the whole context.
CONCURRENCY = 2


@dataclass(frozen=True)
class KVShape:
    """What one token costs in a model's KV cache: facts of its ``config.json``."""

    layers: int  # layers that cache keys and values (an encoder-decoder: self + cross)
    kv_heads: int
    head_dim: int
    window: int | None = None  # sliding window, in tokens
    windowed_layers: int = 0  # how many of ``layers`` attend only over the window

    def bytes_per_sequence(self, context: int, dtype_bits: int) -> int:
        """KV bytes one sequence of ``context`` tokens holds."""
        per_layer_token = 2 * self.kv_heads * self.head_dim * dtype_bits // 8
        windowed = min(self.window or context, context)
        full_layers = self.layers - self.windowed_layers
        return per_layer_token * (full_layers * context + self.windowed_layers * windowed)


def estimate_memory(weights_bytes: int, kv_bytes: int, overhead: int = ENGINE_OVERHEAD_BYTES) -> int:
    """Bytes an engine needs: its weights, its KV cache and its processes' overhead."""
    return weights_bytes + kv_bytes + overhead


def entry_memory(entry: ModelEntry, shape: KVShape, concurrency: int = CONCURRENCY) -> int:
    """The ``memory`` figure of a registry entry, from its parameter count, dtype and
    context, rounded up to whole GiB. Raises ValueError for an entry lacking them."""
    weights = entry.weight_bytes()
    if weights is None or entry.max_model_len is None:
        raise ValueError("the entry needs parameters_b and max_model_len to be estimated")
    kv = shape.bytes_per_sequence(entry.max_model_len, DTYPE_BITS[entry.dtype]) * concurrency
    return math.ceil(estimate_memory(weights, kv) / GiB) * GiB
