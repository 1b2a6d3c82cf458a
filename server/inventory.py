"""What each registered model needs on disk, and whether this machine has it.

``v4serve models`` and ``v4serve pull`` both start from the same question: which weight
sources does serving a model take? A LoRA entry takes its base's weights as well as its
adapter, and an entry with its own ``tokenizer`` takes that repo too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from server.registry import ModelEntry, RegisteredModel, Registry
from server.weights import is_present


@dataclass(frozen=True)
class WeightSource:
    source: str
    revision: str | None = None
    gated: bool = False


def weight_sources(registered: RegisteredModel, registry: Registry) -> list[WeightSource]:
    """The sources serving the model reads, its base's first for a LoRA entry."""
    entry = registered.entry
    if not entry.is_adapter:
        return _own_sources(entry)
    base = serving_entry(registered, registry)
    return [*(_own_sources(base) if base is not None else []), WeightSource(entry.adapter or "")]


def serving_entry(registered: RegisteredModel, registry: Registry) -> ModelEntry | None:
    """The entry whose engine serves the model: a LoRA entry's base (None if missing)."""
    if not registered.entry.is_adapter:
        return registered.entry
    base = registry.resolve(registered.entry.base or "")
    return base.entry if base is not None else None


def weights_present(registered: RegisteredModel, registry: Registry, home: Path) -> bool:
    """Whether every source the model reads is on this machine, without fetching any."""
    return all(
        is_present(weights.source, home, revision=weights.revision) for weights in weight_sources(registered, registry)
    )


def _own_sources(entry: ModelEntry) -> list[WeightSource]:
    sources = [WeightSource(entry.source or "", entry.revision, entry.gated)]
    if entry.tokenizer:
        sources.append(WeightSource(entry.tokenizer))
    return sources
