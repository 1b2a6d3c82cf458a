"""Weights on the Hugging Face hub: what the local cache holds, and fetching the rest.

Serving machines are often cut off from the hub (air-gapped clusters, firewalls that
drop packets), and huggingface_hub's own metadata requests wait without a time limit.
So a fetch first asks the hub about the repo with a short timeout: a machine that cannot
reach it learns so in seconds, with a message that names the repo and what to do,
instead of a model load that hangs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import httpx2
from huggingface_hub import (
    HfApi,
    constants,
    get_cached_repo_tree,
    get_token,
    snapshot_download,
)
from huggingface_hub.errors import (
    CachedRepoTreeNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

logger = logging.getLogger(__name__)

# Files no engine here reads. Llama-3 repos hold their weights a second time under
# original/, Mixtral ones as consolidated .pt files: fetching them would double a
# 140 GB download.
_NEVER_LOADED = (
    "original/*",
    "*.pth",
    "*.gguf",
    "*.h5",
    "*.msgpack",
    "*.ot",
    "*.onnx",
    "onnx/*",
    "*.tflite",
)
# Pickled PyTorch weights, left out where the repo has the same weights as safetensors.
_PICKLED = ("*.bin", "*.pt")


class HubError(RuntimeError):
    """A hub repo's weights cannot be made present in the local cache."""


class HubUnreachableError(HubError):
    """The hub did not answer, so nothing missing from the cache can be fetched."""


def skipped_files(files: Iterable[str]) -> list[str]:
    """Patterns of the files of a repo listing that a download leaves out."""
    has_safetensors = any("/" not in name and name.endswith(".safetensors") for name in files)
    return [*_NEVER_LOADED, *(_PICKLED if has_safetensors else ())]


def has_token() -> bool:
    """Whether downloads send a token: HF_TOKEN, or one saved by `hf auth login`."""
    return get_token() is not None


def cached_snapshot(repo_id: str, revision: str | None = None) -> Path | None:
    """The repo's snapshot folder if the cache holds every file a load needs; no network.

    Completeness is judged from the file listing huggingface_hub caches with a download.
    A cache filled by a client that keeps no listing cannot be judged, and is trusted.
    """
    try:
        listed = [entry.path for entry in get_cached_repo_tree(repo_id, revision=revision)]
    except CachedRepoTreeNotFoundError:
        listed = []
    try:
        folder = snapshot_download(
            repo_id, revision=revision, local_files_only=True, ignore_patterns=skipped_files(listed)
        )
    except LocalEntryNotFoundError:
        return None
    return Path(folder)


def download(repo_id: str, revision: str | None = None) -> Path:
    """Fetch what the cache lacks of the repo, with progress bars, and return its folder.

    Files already cached are kept and partial ones resumed, so an interrupted pull only
    fetches the rest. The token is huggingface_hub's: HF_TOKEN, or a saved login.
    """
    files = _listing(repo_id, revision)
    logger.info("downloading %s into the Hugging Face cache (%s)", repo_id, constants.HF_HUB_CACHE)
    try:
        folder = snapshot_download(repo_id, revision=revision, ignore_patterns=skipped_files(files))
    except (httpx2.TransportError, LocalEntryNotFoundError) as exc:
        raise _unreachable(repo_id, exc) from exc
    except HfHubHTTPError as exc:
        raise HubError(f"downloading '{repo_id}' failed: {exc}") from exc
    return Path(folder)


def ensure_snapshot(repo_id: str, revision: str | None = None) -> Path:
    """The repo's cached snapshot, downloaded first where the cache lacks any of it."""
    return cached_snapshot(repo_id, revision) or download(repo_id, revision)


def _listing(repo_id: str, revision: str | None) -> list[str]:
    """The repo's file names, asked with a short timeout so an unreachable hub fails fast.

    The timeout is huggingface_hub's for metadata requests (HF_HUB_ETAG_TIMEOUT, 10 s
    unless set), which an operator on a slow link can already raise.
    """
    try:
        info = HfApi().model_info(repo_id, revision=revision, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except OfflineModeIsEnabled as exc:
        raise HubError(
            f"'{repo_id}' is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and "
            "HF_HUB_OFFLINE is set, so it cannot be downloaded; unset HF_HUB_OFFLINE, or run "
            "`v4serve pull` where the hub is reachable and copy the cache here"
        ) from exc
    except httpx2.TransportError as exc:
        raise _unreachable(repo_id, exc) from exc
    except GatedRepoError as exc:
        raise HubError(
            f"'{repo_id}' is gated: accept its licence at {constants.ENDPOINT}/{repo_id} and set "
            "HF_TOKEN to a token of that account"
        ) from exc
    except RevisionNotFoundError as exc:
        raise HubError(f"'{repo_id}' has no revision '{revision}' on the hub") from exc
    except RepositoryNotFoundError as exc:
        raise HubError(
            f"'{repo_id}' is not on the hub at {constants.ENDPOINT}, or is private and HF_TOKEN "
            "does not grant access to it"
        ) from exc
    except HfHubHTTPError as exc:
        raise HubError(f"the hub refused to describe '{repo_id}': {exc}") from exc
    return [sibling.rfilename for sibling in info.siblings or ()]


def _unreachable(repo_id: str, exc: BaseException) -> HubUnreachableError:
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return HubUnreachableError(
        f"'{repo_id}' is not fully in the local Hugging Face cache ({constants.HF_HUB_CACHE}) "
        f"and the hub at {constants.ENDPOINT} cannot be reached ({reason}); check the network "
        "or proxy, set HF_ENDPOINT to a reachable mirror, or run `v4serve pull` on a machine "
        "that reaches the hub and copy its Hugging Face cache (HF_HOME) here"
    )
