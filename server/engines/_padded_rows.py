"""Sequences of different lengths held as rows of one tensor: padding, masks and KV caches.

Both batch kinds (``_seq2seq_batch``, ``_causal_batch``) keep each row's attention keys
and values in a transformers cache whose layers hold tensors shaped (rows, heads,
columns, head size), padded to a common width on one side and masked. Rows join
(``join``) and leave (``select``) between steps; these helpers do both for a cache and
its attention mask together, so the two never disagree about which columns are padding.

Left padding keeps the newest token of every row in the last column (where the next
step's query goes); right padding suits encoder outputs, which never grow.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F


def pad_prompts(
    prompts: Sequence[Sequence[int]], pad_token_id: int, device: Any, *, left: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token IDs padded to the longest prompt, and the attention mask that hides the padding."""
    width = max(len(prompt) for prompt in prompts)
    ids, masks = [], []
    for prompt in prompts:
        padding = width - len(prompt)
        ids.append([*[pad_token_id] * padding, *prompt] if left else [*prompt, *[pad_token_id] * padding])
        masks.append([0] * padding + [1] * len(prompt) if left else [1] * len(prompt) + [0] * padding)
    return (
        torch.tensor(ids, dtype=torch.long, device=device),
        torch.tensor(masks, dtype=torch.long, device=device),
    )


def join(mine: Any, theirs: Any, my_mask: torch.Tensor, their_mask: torch.Tensor, *, left: bool) -> torch.Tensor:
    """Append the rows of cache ``theirs`` to cache ``mine``, in place; returns the joined mask.

    Both are padded to the wider of the two first, on the side the batch pads.
    """
    width = max(my_mask.shape[1], their_mask.shape[1])
    for layer, their_layer in zip(mine.layers, theirs.layers, strict=True):
        layer.keys = _stack(layer.keys, their_layer.keys, width, dim=2, left=left)
        layer.values = _stack(layer.values, their_layer.values, width, dim=2, left=left)
    return _stack(my_mask, their_mask, width, dim=1, left=left)


def select(cache: Any, mask: torch.Tensor, rows: Sequence[int], *, left: bool) -> torch.Tensor:
    """Keep only ``rows`` of the cache, in place, and drop the padding no remaining row
    needs, so one long sequence does not pad the others forever; returns the new mask."""
    index = torch.tensor(rows, dtype=torch.long, device=mask.device)
    mask = mask[index]
    used = mask.any(dim=0).nonzero()
    columns = slice(int(used[0]), None) if left else slice(None, int(used[-1]) + 1)
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[index, :, columns], layer.values[index, :, columns]
    return mask[:, columns]


def one_more_column(mask: torch.Tensor) -> torch.Tensor:
    """The mask once every row has taken one more token (the column after the last)."""
    return F.pad(mask, (0, 1), value=1)


def _stack(top: torch.Tensor, bottom: torch.Tensor, width: int, *, dim: int, left: bool) -> torch.Tensor:
    """Rows of ``top`` then ``bottom``, both padded to ``width`` along ``dim`` first."""
    return torch.cat([_pad(top, width, dim, left), _pad(bottom, width, dim, left)])


def _pad(tensor: torch.Tensor, width: int, dim: int, left: bool) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    # F.pad lists (before, after) pairs from the last dimension backwards.
    widths = [0, 0] * (tensor.dim() - 1 - dim) + ([missing, 0] if left else [0, missing])
    return F.pad(tensor, widths)
