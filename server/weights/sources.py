"""Turning a registry ``source`` into something an engine can load."""

from __future__ import annotations

from pathlib import Path

from server.weights.tiny import ensure_builtin

BUILTIN_PREFIX = "builtin:"


def resolve_source(source: str, home: Path) -> str:
    """A local directory or a Hugging Face repo ID for the engine.

    ``builtin:NAME`` sources are generated under ``home`` on first use; local paths are
    expanded; anything else is handed to the engine as a hub repo ID. Model weights and
    LoRA adapters resolve the same way.
    """
    if source.startswith(BUILTIN_PREFIX):
        return str(ensure_builtin(source[len(BUILTIN_PREFIX) :], home))
    local = Path(source).expanduser()
    if source.startswith(("/", ".", "~")) or local.is_dir():
        return str(local.resolve())
    return source
