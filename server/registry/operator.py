"""The operator file: registry changes made at run time, kept under the server's home.

The admin API adds, replaces and removes entries while the server runs. Each change is
written here before it takes effect, and at start-up (and on every reload) this layer is
laid over the registry files, last, so what an operator changed through the API survives
a restart and a reload alike. An entry here replaces an entry of the same ID whole, as a
later registry file does; ``removed`` lists IDs taken out of the files below it (a
registry file has no way to say "not this one").

The file is rewritten whole, through a temporary file and a rename, so a crash leaves
either the old or the new version, never half of one.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from server.registry.loader import Registry, RegistryError, _describe, load_registry, read_yaml_mapping
from server.registry.schema import ModelEntry

OPERATOR_FILE_NAME = "operator_registry.yaml"
_HEADER = (
    "# Written by v4serve's admin API (PUT/DELETE /v4/admin/models/ID): registry changes made\n"
    "# at run time, laid over the registry files at start-up and on every reload.\n"
)


def operator_file(home: Path) -> Path:
    """Where the server under ``home`` keeps its operator layer."""
    return home / OPERATOR_FILE_NAME


class OperatorLayer(BaseModel):
    """What the admin API changed: entries added or replaced, and IDs removed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    models: dict[str, ModelEntry] = Field(
        default_factory=dict, description="Entries added or replaced, each replacing one of the same ID whole."
    )
    removed: tuple[str, ...] = Field(default=(), description="Model IDs taken out of the registry files.")

    def with_entry(self, model_id: str, entry: ModelEntry) -> OperatorLayer:
        removed = tuple(name for name in self.removed if name != model_id)
        return OperatorLayer(models={**self.models, model_id: entry}, removed=removed)

    def without(self, model_id: str, *, in_files: bool) -> OperatorLayer:
        """``model_id`` gone; recorded as removed when the registry files define it."""
        models = {name: entry for name, entry in self.models.items() if name != model_id}
        removed = (*self.removed, model_id) if in_files and model_id not in self.removed else self.removed
        return OperatorLayer(models=models, removed=removed)

    def apply(self, registry: Registry, origin: Path) -> Registry:
        """``registry`` with this layer laid over it; an ID removed that is not there is ignored."""
        return registry.with_changes(self.models, self.removed, origin=origin)


def read_operator_layer(path: Path) -> OperatorLayer:
    """The layer in ``path``; an empty one when the file does not exist yet."""
    raw = read_yaml_mapping(path, "operator registry file", "'models' and 'removed' keys", missing_ok=True)
    if raw is None:
        return OperatorLayer()
    try:
        return OperatorLayer.model_validate(raw)
    except ValidationError as exc:
        raise RegistryError("\n".join(_describe(path, e) for e in exc.errors())) from exc


def write_operator_layer(path: Path, layer: OperatorLayer) -> None:
    """Replace ``path`` with ``layer`` atomically (temporary file, fsync, rename)."""
    data: dict[str, Any] = {
        "models": {
            model_id: entry.model_dump(mode="json", exclude_unset=True) for model_id, entry in layer.models.items()
        },
        "removed": list(layer.removed),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as out:
            out.write(_HEADER)
            yaml.safe_dump(data, out, sort_keys=False, allow_unicode=True)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    # The rename is durable only once the directory entry is.
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def load_serving_registry(registry_files: Iterable[Path], operator_path: Path) -> Registry:
    """What the server serves: the registry files as ``load_registry`` merges them, with
    the operator layer in ``operator_path`` laid over them."""
    return read_operator_layer(operator_path).apply(load_registry(registry_files), operator_path)
