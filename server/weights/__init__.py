"""Where a registry entry's weights come from, and making them present locally."""

from server.weights.sources import BUILTIN_PREFIX, resolve_source

__all__ = ["BUILTIN_PREFIX", "resolve_source"]
