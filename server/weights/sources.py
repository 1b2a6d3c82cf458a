"""Turning a registry ``source`` into a local directory an engine can load."""

from __future__ import annotations

from pathlib import Path

from server.weights import hub
from server.weights.tiny import ensure_builtin

BUILTIN_PREFIX = "builtin:"


def local_dir(source: str) -> Path | None:
    """The directory ``source`` names on this machine; None for a hub repo or a builtin."""
    if source.startswith(BUILTIN_PREFIX):
        return None
    local = Path(source).expanduser()
    if source.startswith(("/", ".", "~")) or local.is_dir():
        return local.resolve()
    return None


def resolve_source(source: str, home: Path, *, revision: str | None = None) -> str:
    """The local directory the engine loads ``source`` from, made present first.

    ``builtin:NAME`` sources are generated under ``home`` on first use; local paths are
    expanded; a hub repo is its snapshot in the Hugging Face cache, downloaded where the
    cache lacks any of it. An unreachable hub raises ``HubUnreachableError`` within
    seconds instead of leaving the engine to wait on it, and an engine handed a directory
    never touches the network itself. Model weights and LoRA adapters resolve the same way.
    """
    if source.startswith(BUILTIN_PREFIX):
        return str(ensure_builtin(source[len(BUILTIN_PREFIX) :], home))
    local = local_dir(source)
    if local is not None:
        return str(local)
    return str(hub.ensure_snapshot(source, revision))


def is_present(source: str, home: Path, *, revision: str | None = None) -> bool:
    """Whether ``source``'s weights are on this machine, without generating or fetching them."""
    if source.startswith(BUILTIN_PREFIX):
        # Where ensure_builtin puts a generated model.
        return (home / "builtin" / source[len(BUILTIN_PREFIX) :]).is_dir()
    local = local_dir(source)
    if local is not None:
        return local.is_dir()
    return hub.cached_snapshot(source, revision) is not None
