"""Changing the registry of a running server: validate, persist, then apply.

Every change is validated as a registry file is (the schema, then the merged registry's
checks: names, aliases, an adapter's base, then ``v4serve check``'s checks of the entry),
written to the operator file under the home (``server.registry.operator``), and only then
handed to the pool, which applies it without cutting a request short
(``EnginePool.replace_registry``). Changes run one at a time, so two of them cannot both
start from the same registry and lose one another.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.errors import ModelNotFoundError, ServingError
from server.pool import EnginePool
from server.pool.live import ConflictError, RegistryChanges
from server.registry import RegisteredModel, Registry, RegistryError, load_registry
from server.registry.check import check_entry
from server.registry.loader import validate_registry_data
from server.registry.operator import (
    OperatorLayer,
    load_serving_registry,
    read_operator_layer,
    write_operator_layer,
)

logger = logging.getLogger(__name__)

_KEY = re.compile(r"key '([^']+)'")


class InvalidEntryError(ServingError):
    """An entry (or the registry it would make) that a registry file could not hold either."""

    status_code = 422
    error_type = "invalid_registry_entry"


def _invalid(exc: RegistryError | str) -> InvalidEntryError:
    message = str(exc)
    key = _KEY.search(message)
    return InvalidEntryError(message, param=key.group(1) if key else None)


@dataclass(frozen=True)
class EntryChange:
    """What a PUT did: the entry as registered, whether it is new, the warnings ``check``
    has about it, and what changed in the pool."""

    registered: RegisteredModel
    created: bool
    warnings: tuple[str, ...]
    changes: RegistryChanges


class RegistryControl:
    def __init__(self, pool: EnginePool, registry_files: Sequence[Path], operator_path: Path):
        self._pool = pool
        self.registry_files = tuple(registry_files)
        self.operator_path = operator_path
        self._lock = asyncio.Lock()

    @property
    def registry(self) -> Registry:
        return self._pool.registry

    def entry(self, model_id: str) -> RegisteredModel:
        registered = self.registry.model(model_id)
        if registered is None:
            raise ModelNotFoundError(f"no model '{model_id}' in the registry", param="model_id")
        return registered

    async def put(self, model_id: str, raw: dict[str, Any]) -> EntryChange:
        """Add or replace the entry ``model_id``; 422 for what a registry file could not say."""
        async with self._lock:
            try:
                parsed = validate_registry_data({"models": {model_id: raw}}, self.operator_path)
                entry = parsed.models[model_id]
                registry = self.registry.with_changes({model_id: entry}, origin=self.operator_path)
            except RegistryError as exc:
                raise _invalid(exc) from exc
            registered = registry.model(model_id)
            assert registered is not None
            problems = await asyncio.to_thread(check_entry, registered)
            errors = [str(p) for p in problems if not p.warning]
            if errors:
                raise _invalid("\n".join(errors))
            created = self.registry.model(model_id) is None
            layer = await asyncio.to_thread(read_operator_layer, self.operator_path)
            await self._persist(layer.with_entry(model_id, entry))
            changes = await self._pool.replace_registry(registry)
        logger.info("registry entry %s %s through the admin API", model_id, "added" if created else "replaced")
        warnings = tuple(str(p) for p in problems if p.warning)
        return EntryChange(registered, created, warnings, changes)

    async def delete(self, model_id: str) -> RegistryChanges:
        """Remove the entry ``model_id``; 409 while an adapter or an alias depends on it."""
        async with self._lock:
            self.entry(model_id)
            try:
                registry = self.registry.with_changes({}, [model_id], origin=self.operator_path)
            except RegistryError as exc:
                raise ConflictError(f"model '{model_id}' cannot be removed: {exc}", param="model_id") from exc
            in_files = await asyncio.to_thread(self._in_files, model_id)
            layer = await asyncio.to_thread(read_operator_layer, self.operator_path)
            await self._persist(layer.without(model_id, in_files=in_files))
            changes = await self._pool.replace_registry(registry)
        logger.info("registry entry %s removed through the admin API", model_id)
        return changes

    async def set_pinned(self, model_id: str, pinned: bool) -> RegistryChanges:
        """Pin (load now, never unload) or unpin a model: a change of its entry, persisted."""
        entry = self.entry(model_id).entry
        if entry.base is not None:
            raise ConflictError(
                f"'{model_id}' is a LoRA adapter, served by the engine of model '{entry.base}'; pin that model",
                param="model_id",
            )
        if entry.pinned == pinned:
            return RegistryChanges()
        raw = entry.model_dump(exclude_unset=True) | {"pinned": pinned}
        return (await self.put(model_id, raw)).changes

    async def reload(self) -> RegistryChanges:
        """Read the registry files and the operator file again, and serve what they say now."""
        async with self._lock:
            try:
                registry = await asyncio.to_thread(load_serving_registry, self.registry_files, self.operator_path)
            except RegistryError as exc:
                raise _invalid(exc) from exc
            changes = await self._pool.replace_registry(registry)
        logger.info(
            "registry reloaded: added %s, removed %s, changed %s",
            list(changes.added),
            list(changes.removed),
            list(changes.changed),
        )
        return changes

    def _in_files(self, model_id: str) -> bool:
        """Whether the registry files define ``model_id`` (its removal must then be recorded)."""
        try:
            return load_registry(self.registry_files).model(model_id) is not None
        except RegistryError:
            return True  # recording a removal that turns out needless does no harm

    async def _persist(self, layer: OperatorLayer) -> None:
        """Written before the change is served: what serves is what a restart would serve."""
        await asyncio.to_thread(write_operator_layer, self.operator_path, layer)
