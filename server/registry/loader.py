"""Reading registry files, laying operator files over the shipped one, and validating.

Every problem is reported with the file, the model ID and the key it concerns, because
the person reading the error is an operator with the YAML open in an editor.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from server.registry.schema import ModelEntry, RegistryFile


def _shipped_registry() -> Path:
    # A wheel carries the file inside the package; a source checkout keeps it at the root.
    package_dir = Path(__file__).resolve().parents[1]
    packaged = package_dir / "model_registry.yaml"
    return packaged if packaged.exists() else package_dir.parent / "model_registry.yaml"


SHIPPED_REGISTRY = _shipped_registry()


class RegistryError(ValueError):
    """A registry file is unreadable or says something invalid."""


@dataclass(frozen=True)
class RegisteredModel:
    model_id: str
    entry: ModelEntry
    origin: Path


@dataclass(frozen=True)
class Alias:
    """A top-level ``aliases:`` item: ``name`` serves ``target``."""

    name: str
    target: str
    origin: Path


class Registry:
    """The merged, validated view of every registry file, with alias resolution."""

    def __init__(
        self,
        models: Mapping[str, RegisteredModel],
        aliases: Mapping[str, Alias] | None = None,
        hosted_vendor_ids: Iterable[str] = (),
    ):
        self._models = dict(models)
        self._aliases = dict(aliases or {})
        self.hosted_vendor_ids = frozenset(hosted_vendor_ids)
        self._names: dict[str, str] = {}
        for model_id, registered in self._models.items():
            self._claim(model_id, model_id, f"{registered.origin}: model '{model_id}'")
        for model_id, registered in self._models.items():
            for name in registered.entry.aliases:
                self._claim(name, model_id, f"{registered.origin}: model '{model_id}': key 'aliases'")
            self._check_base(registered)
        for alias in (aliases or {}).values():
            if alias.target not in self._names:
                raise RegistryError(
                    f"{alias.origin}: key 'aliases.{alias.name}': '{alias.target}' is not a registered model"
                )
            self._claim(alias.name, self._names[alias.target], f"{alias.origin}: key 'aliases.{alias.name}'")

    def _check_base(self, registered: RegisteredModel) -> None:
        """A LoRA adapter runs on its base's vLLM engine, so the base must be one."""
        base_id = registered.entry.base
        if base_id is None:
            return
        where = f"{registered.origin}: model '{registered.model_id}': key 'base'"
        base = self._models.get(base_id)
        if base is None:
            raise RegistryError(f"{where}: '{base_id}' is not a registered model ID")
        if base.entry.is_adapter:
            raise RegistryError(f"{where}: '{base_id}' is itself a LoRA adapter, not a base model")
        if base.entry.engine != "vllm":
            raise RegistryError(
                f"{where}: LoRA adapters are served by vLLM, and '{base_id}' uses engine '{base.entry.engine}'"
            )

    def _claim(self, name: str, model_id: str, where: str) -> None:
        owner = self._names.get(name)
        if owner is not None and owner != model_id:
            raise RegistryError(f"{where}: '{name}' is already the ID or an alias of model '{owner}'")
        self._names[name] = model_id

    def resolve(self, name: str) -> RegisteredModel | None:
        model_id = self._names.get(name)
        return None if model_id is None else self._models[model_id]

    def model(self, model_id: str) -> RegisteredModel | None:
        """The entry registered under exactly ``model_id`` (not an alias)."""
        return self._models.get(model_id)

    def with_changes(self, put: Mapping[str, ModelEntry], removed: Iterable[str] = (), *, origin: Path) -> Registry:
        """A new registry with the ``put`` entries added or replaced (from ``origin``) and the
        ``removed`` IDs gone, checked as a whole as ``load_registry`` checks files.

        An entry replaces one of the same ID whole, and a model ID takes over a top-level
        alias of that name, as a later file does. Raises ``RegistryError`` for what loading
        would refuse: a clash of names, an adapter whose base is gone, an alias of a removed
        model.
        """
        gone = set(removed)
        models = {model_id: m for model_id, m in self._models.items() if model_id not in gone}
        models.update({model_id: RegisteredModel(model_id, entry, origin) for model_id, entry in put.items()})
        aliases = {name: alias for name, alias in self._aliases.items() if name not in models}
        return Registry(models, aliases, self.hosted_vendor_ids)

    def __iter__(self) -> Iterator[RegisteredModel]:
        return iter(self._models.values())

    def __len__(self) -> int:
        return len(self._models)

    def __contains__(self, name: object) -> bool:
        return name in self._names


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys; a registry must refuse them instead."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise RegistryError(f"line {key_node.start_mark.line + 1}: key '{key}' is defined twice")
        seen.add(key)
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def _describe(path: Path, error: ErrorDetails) -> str:
    loc = [str(part) for part in error["loc"]]
    if len(loc) >= 2 and loc[0] == "models":
        where = f"model '{loc[1]}'"
        key = ".".join(loc[2:])
        if key:
            where += f": key '{key}'"
    else:
        where = f"key '{'.'.join(loc)}'"
    return f"{path}: {where}: {error['msg']}"


def read_registry_file(path: Path) -> RegistryFile:
    """Parse and validate one file."""
    raw = read_yaml_mapping(path, "registry file", "a 'models' key")
    return validate_registry_data(raw or {}, path)


def read_yaml_mapping(path: Path, what: str, keys: str, *, missing_ok: bool = False) -> dict[str, Any] | None:
    """The YAML mapping in ``path`` (duplicate keys refused), None if it is missing and
    ``missing_ok``; every failure is a ``RegistryError`` naming the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        if missing_ok:
            return None
        raise RegistryError(f"{path}: cannot read the {what}: {exc.strerror}") from exc
    except OSError as exc:
        raise RegistryError(f"{path}: cannot read the {what}: {exc.strerror}") from exc
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except RegistryError as exc:
        raise RegistryError(f"{path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise RegistryError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise RegistryError(f"{path}: the {what} must be a mapping with {keys}")
    return raw


def validate_registry_data(raw: dict[str, Any], origin: Path) -> RegistryFile:
    """Validate the parsed content of a registry file (or an entry sent to the admin API
    as ``{"models": {ID: entry}}``); errors name ``origin``, the model ID and the key."""
    try:
        return RegistryFile.model_validate(raw)
    except ValidationError as exc:
        raise RegistryError("\n".join(_describe(origin, e) for e in exc.errors())) from exc


def load_registry(overlays: Iterable[Path] = (), *, shipped: Path | None = SHIPPED_REGISTRY) -> Registry:
    """The shipped registry with each operator file laid over it, in order.

    An operator entry replaces a shipped entry of the same ID whole: merging key by key
    would leave a custom checkpoint running with settings meant for another model.
    """
    models: dict[str, RegisteredModel] = {}
    aliases: dict[str, Alias] = {}
    hosted: set[str] = set()
    for path in ([shipped] if shipped is not None else []) + [Path(p) for p in overlays]:
        parsed = read_registry_file(path)
        for model_id, entry in parsed.models.items():
            models[model_id] = RegisteredModel(model_id=model_id, entry=entry, origin=path)
            aliases.pop(model_id, None)
        aliases.update({name: Alias(name, target, path) for name, target in parsed.aliases.items()})
        hosted.update(parsed.hosted_vendor_ids)
    return Registry(models, aliases, hosted)
