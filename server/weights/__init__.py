"""Where a registry entry's weights come from, and making them present locally."""

from server.weights.adapters import lora_rank
from server.weights.hub import HubError, HubUnreachableError
from server.weights.sources import BUILTIN_PREFIX, is_present, local_dir, resolve_source

__all__ = [
    "BUILTIN_PREFIX",
    "HubError",
    "HubUnreachableError",
    "is_present",
    "local_dir",
    "lora_rank",
    "resolve_source",
]
