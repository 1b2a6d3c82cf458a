"""The state of decoder-only sequences generated together, one row each.

Continuous batching for a decoder-only (causal) model: a sequence's prompt runs through
the model once, when it joins (``prefill``, which fills its KV cache and gives the
logits of its first token); from then on one step feeds every row its newest token.
Rows join (``extend``) and leave (``keep``) between steps, so a request never waits for
the batch it arrived during to finish.

Rows differ in length, so the KV cache is padded on the left (``_padded_rows``) and
every row's newest token sits in the last column. The attention mask hides the padding
from each row, and what a row's positions are must not change with it:

- rotary and learned absolute positions are given explicitly (``position_ids``), as the
  count of the row's real tokens before each one, so a padded row sees the positions it
  would see alone;
- ALiBi models (MPT, BLOOM) bias attention by query-key distance, which left padding
  does not change (MPT measures it from the newest column, BLOOM from the mask).

That holds only for models whose every layer caches all keys and values of plain
attention; sliding-window, recurrent and state-space layers keep other state. The model
types in ``server.registry.engine_kinds.DECODER_ONLY_MODELS`` are those checked to decode batched exactly as alone
(tests/test_transformers_causal.py compares them with ``generate``).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from typing import Any

import torch

from server.engines._padded_rows import join, one_more_column, pad_prompts, select


class CausalBatch:
    def __init__(self, model: Any, cache: Any, mask: torch.Tensor):
        self._model = model
        self._cache = cache
        self._mask = mask

    @classmethod
    def prefill(
        cls,
        model: Any,
        prompts: Sequence[Sequence[int]],
        pad_token_id: int,
        decoded: Sequence[Sequence[int]] = (),
    ) -> tuple[CausalBatch, torch.Tensor]:
        """Run sequences' prompts, each followed by the tokens it already ``decoded`` (when a
        sequence is rebuilt after a failed step); returns their batch and the logits of each
        one's next token."""
        sequences = [[*prompt, *tokens] for prompt, tokens in zip(prompts, decoded or [()] * len(prompts), strict=True)]
        input_ids, mask = pad_prompts(sequences, pad_token_id, model.device, left=True)
        # Padding gets position 0 too: it is masked, and the models' tables start there.
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        # Only the last position's logits are needed: a prompt's worth would take
        # prompt length x vocabulary floats.
        output = model(
            input_ids=input_ids,
            attention_mask=mask,
            use_cache=True,
            **_optional(model, position_ids=positions, logits_to_keep=1),
        )
        return cls(model, output.past_key_values, mask), output.logits[:, -1]

    def step(self, tokens: Sequence[int]) -> torch.Tensor:
        """Feed each row its newest token; returns the logits for the token after it."""
        mask = one_more_column(self._mask)
        # Each row's newest token comes after all its real ones.
        positions = mask.sum(dim=1, keepdim=True) - 1
        newest = torch.tensor(tokens, device=mask.device).unsqueeze(1)
        output = self._model(
            input_ids=newest,
            attention_mask=mask,
            past_key_values=self._cache,
            use_cache=True,
            **_optional(self._model, position_ids=positions),
        )
        self._cache, self._mask = output.past_key_values, mask
        return output.logits[:, -1]

    def extend(self, other: CausalBatch) -> None:
        """Append ``other``'s rows after this batch's."""
        self._mask = join(self._cache, other._cache, self._mask, other._mask, left=True)

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only ``rows`` (finished and aborted sequences leave)."""
        self._mask = select(self._cache, self._mask, rows, left=True)


def _optional(model: Any, **arguments: Any) -> dict[str, Any]:
    """The arguments the model's ``forward`` names (MPT's takes no ``position_ids``:
    ALiBi needs none)."""
    accepted = _forward_parameters(model.__class__)
    return {name: value for name, value in arguments.items() if name in accepted}


@functools.cache
def _forward_parameters(model_class: Any) -> frozenset[str]:
    return frozenset(inspect.signature(model_class.forward).parameters)
