"""The decoder state of encoder-decoder sequences generated together, one row each.

Continuous batching for an encoder-decoder model: each sequence is encoded once, when
it joins (``prefill``, which also runs its first decoder step and so fills its
cross-attention cache); from then on one decoder step serves every row. Rows join
(``extend``) and leave (``keep``) between steps, so a request never waits for the
batch it arrived during to finish.

Rows differ in length twice over, and both are padded and masked: encoder outputs
(cross-attention keys) are padded on the right, decoder self-attention caches on the
left, so every row's newest token sits in the same column. Left padding keeps each
row's attention pattern intact only because T5's positions are relative (a bias from
query-key distance, which padding does not change); decoders with absolute positions
would see shifted positions, which is why the engine accepts only ``RELATIVE_POSITION_MODELS``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

# Model types whose decoder positions are relative, so left-padded rows decode exactly
# as they would alone.
RELATIVE_POSITION_MODELS = frozenset({"t5", "mt5", "umt5"})

# (tensor, length, dimension) -> the tensor padded to that length along that dimension.
_Padder = Callable[[torch.Tensor, int, int], torch.Tensor]


class Seq2SeqBatch:
    def __init__(self, model: Any, cache: Any, encoder_mask: torch.Tensor, decoder_mask: torch.Tensor):
        self._model = model
        self._cache = cache
        self._encoder_mask = encoder_mask
        self._decoder_mask = decoder_mask

    @classmethod
    def prefill(
        cls, model: Any, prompts: Sequence[Sequence[int]], pad_token_id: int
    ) -> tuple[Seq2SeqBatch, torch.Tensor]:
        """Encode new sequences and run their first decoder step; returns their logits too."""
        device = model.device
        width = max(len(prompt) for prompt in prompts)
        padded = [[*prompt, *[pad_token_id] * (width - len(prompt))] for prompt in prompts]
        masks = [[1] * len(prompt) + [0] * (width - len(prompt)) for prompt in prompts]
        input_ids = torch.tensor(padded, dtype=torch.long, device=device)
        encoder_mask = torch.tensor(masks, dtype=torch.long, device=device)
        encoded = model.get_encoder()(input_ids=input_ids, attention_mask=encoder_mask)
        start = torch.full(
            (len(prompts), 1), model.config.decoder_start_token_id, dtype=torch.long, device=device
        )
        output = model(
            encoder_outputs=(encoded.last_hidden_state,),
            attention_mask=encoder_mask,
            decoder_input_ids=start,
            use_cache=True,
        )
        batch = cls(model, output.past_key_values, encoder_mask, torch.ones_like(start))
        return batch, output.logits[:, -1]

    def step(self, tokens: Sequence[int]) -> torch.Tensor:
        """Feed each row its newest token; returns the logits for the token after it."""
        device = self._decoder_mask.device
        decoder_mask = F.pad(self._decoder_mask, (0, 1), value=1)
        output = self._model(
            encoder_outputs=(self._encoder_placeholder(),),
            attention_mask=self._encoder_mask,
            decoder_input_ids=torch.tensor(tokens, device=device).unsqueeze(1),
            decoder_attention_mask=decoder_mask,
            past_key_values=self._cache,
            use_cache=True,
        )
        self._cache, self._decoder_mask = output.past_key_values, decoder_mask
        return output.logits[:, -1]

    def extend(self, other: Seq2SeqBatch) -> None:
        """Append ``other``'s rows after this batch's."""
        past = max(self._decoder_mask.shape[1], other._decoder_mask.shape[1])
        source = max(self._encoder_mask.shape[1], other._encoder_mask.shape[1])
        caches = (
            (self._cache.self_attention_cache, other._cache.self_attention_cache, _pad_left, past),
            (self._cache.cross_attention_cache, other._cache.cross_attention_cache, _pad_right, source),
        )
        for mine, theirs, pad, length in caches:
            for layer, their_layer in zip(mine.layers, theirs.layers):
                layer.keys = _stack(layer.keys, their_layer.keys, pad, length, dim=2)
                layer.values = _stack(layer.values, their_layer.values, pad, length, dim=2)
        self._decoder_mask = _stack(self._decoder_mask, other._decoder_mask, _pad_left, past, dim=1)
        self._encoder_mask = _stack(self._encoder_mask, other._encoder_mask, _pad_right, source, dim=1)

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only ``rows`` (finished and aborted sequences leave), then drop padding
        no remaining row needs, so one long sequence does not pad the others forever."""
        index = torch.tensor(rows, dtype=torch.long, device=self._decoder_mask.device)
        decoder_mask, encoder_mask = self._decoder_mask[index], self._encoder_mask[index]
        first = int(decoder_mask.any(dim=0).nonzero()[0])
        end = int(encoder_mask.any(dim=0).nonzero()[-1]) + 1
        for layer in self._cache.self_attention_cache.layers:
            layer.keys, layer.values = layer.keys[index, :, first:], layer.values[index, :, first:]
        for layer in self._cache.cross_attention_cache.layers:
            layer.keys, layer.values = layer.keys[index, :, :end], layer.values[index, :, :end]
        self._decoder_mask, self._encoder_mask = decoder_mask[:, first:], encoder_mask[:, :end]

    def _encoder_placeholder(self) -> torch.Tensor:
        """What the decoder is given as encoder output once cross-attention is cached.

        The model reads only its shape (batch, source length) and dtype by then, so a
        broadcast zero stands in instead of keeping every row's encoder states.
        """
        config = self._model.config
        rows, source = self._encoder_mask.shape
        zero = torch.zeros((), dtype=self._model.dtype, device=self._encoder_mask.device)
        return zero.expand(rows, source, config.d_model)


def _stack(top: torch.Tensor, bottom: torch.Tensor, pad: _Padder, length: int, dim: int) -> torch.Tensor:
    """Rows of ``top`` then ``bottom``, both padded to ``length`` along ``dim`` first."""
    return torch.cat([pad(top, length, dim), pad(bottom, length, dim)])


def _pad_left(tensor: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    return _pad(tensor, length - tensor.shape[dim], 0, dim)


def _pad_right(tensor: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    return _pad(tensor, 0, length - tensor.shape[dim], dim)


def _pad(tensor: torch.Tensor, before: int, after: int, dim: int) -> torch.Tensor:
    if before == after == 0:
        return tensor
    # F.pad lists (before, after) pairs from the last dimension backwards.
    widths = [0, 0] * (tensor.dim() - 1 - dim) + [before, after]
    return F.pad(tensor, widths)
