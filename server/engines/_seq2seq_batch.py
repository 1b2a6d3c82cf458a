"""The decoder state of encoder-decoder sequences generated together, one row each.

Continuous batching for an encoder-decoder model: each sequence is encoded once, when
it joins (``prefill``, which also runs its first decoder step and so fills its
cross-attention cache); from then on one decoder step serves every row. Rows join
(``extend``) and leave (``keep``) between steps, so a request never waits for the
batch it arrived during to finish.

Rows differ in length twice over, and both are padded and masked (``_padded_rows``):
encoder outputs (cross-attention keys) are padded on the right, decoder self-attention
caches on the left, so every row's newest token sits in the same column. Left padding
keeps each row's attention pattern intact because T5's positions are relative (a bias
from query-key distance, which padding does not change), which is why the engine
batches only the encoder-decoders in ``engine_kinds.RELATIVE_POSITION_MODELS`` this way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from server.engines._padded_rows import join, one_more_column, pad_prompts, select


class Seq2SeqBatch:
    def __init__(self, model: Any, cache: Any, encoder_mask: torch.Tensor, decoder_mask: torch.Tensor):
        self._model = model
        self._cache = cache
        self._encoder_mask = encoder_mask
        self._decoder_mask = decoder_mask

    @classmethod
    def prefill(
        cls,
        model: Any,
        prompts: Sequence[Sequence[int]],
        pad_token_id: int,
        decoded: Sequence[Sequence[int]] = (),
    ) -> tuple[Seq2SeqBatch, torch.Tensor]:
        """Encode sequences and run the decoder over the start token and the tokens each
        already ``decoded`` (when a sequence is rebuilt after a failed step); returns their
        batch and the logits of each one's next token."""
        device = model.device
        input_ids, encoder_mask = pad_prompts(prompts, pad_token_id, device, left=False)
        encoded = model.get_encoder()(input_ids=input_ids, attention_mask=encoder_mask)
        start = model.config.decoder_start_token_id
        decoder_inputs = [[start, *tokens] for tokens in decoded or [()] * len(prompts)]
        decoder_ids, decoder_mask = pad_prompts(decoder_inputs, pad_token_id, device, left=True)
        output = model(
            encoder_outputs=(encoded.last_hidden_state,),
            attention_mask=encoder_mask,
            decoder_input_ids=decoder_ids,
            decoder_attention_mask=decoder_mask,
            use_cache=True,
        )
        batch = cls(model, output.past_key_values, encoder_mask, decoder_mask)
        return batch, output.logits[:, -1]

    def step(self, tokens: Sequence[int]) -> torch.Tensor:
        """Feed each row its newest token; returns the logits for the token after it."""
        device = self._decoder_mask.device
        decoder_mask = one_more_column(self._decoder_mask)
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
        mine, theirs = self._cache, other._cache
        decoder, encoder = (self._decoder_mask, other._decoder_mask), (self._encoder_mask, other._encoder_mask)
        self._decoder_mask = join(mine.self_attention_cache, theirs.self_attention_cache, *decoder, left=True)
        self._encoder_mask = join(mine.cross_attention_cache, theirs.cross_attention_cache, *encoder, left=False)

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only ``rows`` (finished and aborted sequences leave), then drop padding
        no remaining row needs, so one long sequence does not pad the others forever."""
        cache = self._cache
        self._decoder_mask = select(cache.self_attention_cache, self._decoder_mask, rows, left=True)
        self._encoder_mask = select(cache.cross_attention_cache, self._encoder_mask, rows, left=False)

    def _encoder_placeholder(self) -> torch.Tensor:
        """What the decoder is given as encoder output once cross-attention is cached.

        The model reads only its shape (batch, source length) and dtype by then, so a
        broadcast zero stands in instead of keeping every row's encoder states.
        """
        config = self._model.config
        rows, source = self._encoder_mask.shape
        zero = torch.zeros((), dtype=self._model.dtype, device=self._encoder_mask.device)
        return zero.expand(rows, source, config.d_model)
