"""The model registry: which public model ID is served from which weights, and how."""

from server.registry.loader import (
    SHIPPED_REGISTRY,
    Alias,
    RegisteredModel,
    Registry,
    RegistryError,
    load_registry,
    read_registry_file,
)
from server.registry.schema import ModelEntry, VisionSettings

__all__ = [
    "SHIPPED_REGISTRY",
    "Alias",
    "ModelEntry",
    "RegisteredModel",
    "Registry",
    "RegistryError",
    "VisionSettings",
    "load_registry",
    "read_registry_file",
]
