"""What a registry change means for the engines already running.

A pure comparison of two registries, so the pool (``EnginePool.replace_registry``) acts
on a decision tested without engines. An entry change needs a new engine only when it
touches what the engine was started with; the keys below are read by the pool or the
service per request (or by nobody at run time), so an engine keeps serving through
changes to them. A key not listed here restarts the engine: a new schema key is safe by
default.
"""

from __future__ import annotations

from dataclasses import dataclass

from server.errors import ServingError
from server.registry import ModelEntry, Registry

# Keys an engine-backed entry may change without its engine restarting.
SERVING_KEYS = frozenset(
    {
        "prompt_format",
        "default_max_tokens",
        "aliases",
        "description",
        "architecture",
        "attention_heads",
        "parameters_b",
        "weight_bits",
        "memory",
        "gated",
        "pinned",
        "keep_alive",
        "max_running",
        "max_queued",
    }
)
# What an adapter's base engine holds of it: anything else is read per request.
ADAPTER_WEIGHT_KEYS = ("base", "adapter", "revision")


class ConflictError(ServingError):
    """The request is valid, but the model's present state forbids it (it is serving, pinned...)."""

    status_code = 409
    error_type = "conflict"


@dataclass(frozen=True)
class RegistryChanges:
    """How one registry differs from another, by model ID.

    ``restarted`` and ``live_adapters`` are filled in by the pool once it acted: the
    engines it restarts (an entry's engine keys changed, or a new adapter its base's
    running engine cannot take), and the adapters a running engine took without one.
    """

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    restarted: tuple[str, ...] = ()
    live_adapters: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed)


def compare(old: Registry, new: Registry) -> RegistryChanges:
    old_ids = {m.model_id for m in old}
    new_ids = {m.model_id for m in new}
    changed = []
    for registered in new:
        before = old.model(registered.model_id)
        if before is not None and before.entry != registered.entry:
            changed.append(registered.model_id)
    return RegistryChanges(
        added=tuple(m.model_id for m in new if m.model_id not in old_ids),
        removed=tuple(m.model_id for m in old if m.model_id not in new_ids),
        changed=tuple(changed),
    )


def needs_new_engine(old: ModelEntry, new: ModelEntry) -> bool:
    """Whether an engine-backed entry changed in what its engine was started with."""
    keys = set(type(old).model_fields) - SERVING_KEYS
    return any(getattr(old, key) != getattr(new, key) for key in keys)


def adapter_weights_changed(old: ModelEntry, new: ModelEntry) -> bool:
    """Whether an adapter entry now names other weights (or another base) than before."""
    return any(getattr(old, key) != getattr(new, key) for key in ADAPTER_WEIGHT_KEYS)
