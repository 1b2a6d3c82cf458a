"""The shipped ``memory`` figures are the formula's output, and the formula adds up.

The figures are written by ``scripts/gen_memory.py`` from ``entry_memory`` (weights +
KV bytes a sequence x concurrency + engine overhead); a figure typed by hand, or a
change to a parameter count, dtype or context without regenerating, fails here with the
command that fixes it. How the pool's estimate compares with a real engine's resident
size is measured in tests/test_architectures.py, where the engines run.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from server.pool.memory import memory_need
from server.pool.placement import Device
from server.registry import ModelEntry, load_registry
from server.registry.kv_shapes import KV_SHAPES
from server.registry.memory import CONCURRENCY, ENGINE_OVERHEAD_BYTES, GiB, KVShape, entry_memory, estimate_memory

REPO = Path(__file__).resolve().parents[1]
# What one 80 GB GPU offers models, as the registry's header chooses tensor_parallel_size.
USABLE_PER_GPU = 70 * GiB


def _gen_memory() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_memory", REPO / "scripts" / "gen_memory.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shipped_memory_figures_are_the_formulas() -> None:
    gen = _gen_memory()
    shipped = {m.model_id: m.entry.memory for m in load_registry()}
    wrong = {i: (shipped[i], f) for i, f in gen.expected_figures().items() if shipped[i] != f}
    assert not wrong, f"run `.venv/bin/python scripts/gen_memory.py` to rewrite them: {wrong}"


def test_every_shipped_model_with_weights_has_a_kv_shape() -> None:
    """Each entry that serves its own weights from the hub is covered by the formula."""
    missing = [
        m.model_id
        for m in load_registry()
        if m.entry.source and not m.entry.source.startswith("builtin:") and m.entry.source not in KV_SHAPES
    ]
    assert not missing


def test_shipped_figures_fit_their_gpus() -> None:
    """``memory`` spread over ``tensor_parallel_size`` GPUs fits what one 80 GB GPU offers."""
    too_big = {
        m.model_id: (m.entry.memory, m.entry.tensor_parallel_size)
        for m in load_registry()
        if m.entry.memory is not None and m.entry.memory / m.entry.tensor_parallel_size > USABLE_PER_GPU
    }
    assert not too_big


def test_the_formula_by_hand() -> None:
    """Llama-2-7B at 4096 tokens: 6.7e9 x 2 bytes + 2 sequences x 4096 tokens x 512 KiB + overhead."""
    entry = ModelEntry(source="example/llama", parameters_b=6.7, dtype="float16", max_model_len=4096)
    shape = KVShape(layers=32, kv_heads=32, head_dim=128)
    per_token = 2 * 32 * 32 * 128 * 2
    assert per_token == 512 * 1024
    exact = int(6.7e9 * 2) + CONCURRENCY * 4096 * per_token + ENGINE_OVERHEAD_BYTES
    assert entry_memory(entry, shape) == -(-exact // GiB) * GiB == 19 * GiB
    assert estimate_memory(10, 20, 30) == 60


def test_sliding_window_layers_hold_only_the_window() -> None:
    full = KVShape(layers=4, kv_heads=1, head_dim=64)
    half_windowed = KVShape(layers=4, kv_heads=1, head_dim=64, window=128, windowed_layers=2)
    per_layer_token = 2 * 64 * 2
    assert full.bytes_per_sequence(4096, 16) == 4 * 4096 * per_layer_token
    assert half_windowed.bytes_per_sequence(4096, 16) == (2 * 4096 + 2 * 128) * per_layer_token
    # Shorter than the window: every layer holds the whole sequence.
    assert half_windowed.bytes_per_sequence(100, 16) == full.bytes_per_sequence(100, 16)


def test_entry_without_facts_is_refused() -> None:
    with pytest.raises(ValueError, match="parameters_b and max_model_len"):
        entry_memory(ModelEntry(source="example/x"), KVShape(1, 1, 64))


def test_pool_estimate_uses_the_same_formula(tmp_path: Path) -> None:
    """An entry without ``memory``: files on disk + its KV cache + the engine overhead."""
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 1000)
    (tmp_path / "tokenizer.json").write_bytes(b"\0" * 500)  # not weights
    entry = ModelEntry(source=str(tmp_path), kv_cache_memory=4096)
    host = Device(None, 64 * GiB, 64 * GiB)
    assert memory_need(entry, str(tmp_path), host) == estimate_memory(1000, 4096)
    # A stated figure wins over the estimate.
    stated = ModelEntry(source=str(tmp_path), memory=3 * GiB)
    assert memory_need(stated, str(tmp_path), host) == 3 * GiB


def test_check_mode_reports_a_stale_figure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--check`` lists a figure that differs and exits 1; the rewrite sets it back."""
    gen = _gen_memory()
    text = (REPO / "model_registry.yaml").read_text(encoding="utf-8")
    figures = gen.expected_figures()
    stale = gen.rewrite(text, {"falcon-7b": figures["falcon-7b"] + GiB})
    assert stale != text
    assert gen.rewrite(stale, figures) == text
    copy = tmp_path / "model_registry.yaml"
    copy.write_text(stale, encoding="utf-8")
    monkeypatch.setattr(gen, "SHIPPED_REGISTRY", copy)
    monkeypatch.setattr(sys, "argv", ["gen_memory.py", "--check"])
    assert gen.main() == 1
    monkeypatch.setattr(sys, "argv", ["gen_memory.py"])
    assert gen.main() == 0
    assert copy.read_text(encoding="utf-8") == text
