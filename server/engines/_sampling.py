"""Choosing each sequence's next token from a batch of logits, with its own parameters.

Requests batched together each keep their sampling parameters, so every rule is
applied per row. The rules follow vLLM's, so a model answers alike whichever engine
serves it: the request's logit bias, penalties on the tokens generated so far (OpenAI's
definition), then temperature (0 = greedy), then top-k, then top-p. A row with a seed
draws from its own random generator, so its tokens do not depend on its batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from server.engines.base import SamplingOptions

# vLLM treats temperatures below this as greedy: dividing by them overflows.
_GREEDY_BELOW = 1e-5


def next_tokens(
    logits: torch.Tensor,
    options: Sequence[SamplingOptions],
    generated: Sequence[Sequence[int]],
    generators: Sequence[torch.Generator | None] = (),
) -> list[int]:
    """One token per row of ``logits`` (batch x vocabulary); ``generators``, where given,
    are the rows' own random generators (None: the global one)."""
    logits = logits.float()
    _apply_logit_bias(logits, options)
    _apply_penalties(logits, options, generated)
    chosen = logits.argmax(dim=-1)
    sampled = [row for row, option in enumerate(options) if option.temperature >= _GREEDY_BELOW]
    seeded = {row for row in sampled if row < len(generators) and generators[row] is not None}
    shared = [row for row in sampled if row not in seeded]
    if shared:
        rows = torch.tensor(shared, device=logits.device)
        chosen[rows] = _sample(logits[rows], [options[row] for row in shared])
    for row in seeded:
        chosen[row] = _sample(logits[row : row + 1], [options[row]], generators[row])[0]
    tokens: list[int] = chosen.tolist()
    return tokens


def _apply_logit_bias(logits: torch.Tensor, options: Sequence[SamplingOptions]) -> None:
    for row, option in enumerate(options):
        for token, bias in option.logit_bias:
            logits[row, token] += bias


def _apply_penalties(
    logits: torch.Tensor, options: Sequence[SamplingOptions], generated: Sequence[Sequence[int]]
) -> None:
    for row, (option, tokens) in enumerate(zip(options, generated, strict=True)):
        if not tokens or not (option.presence_penalty or option.frequency_penalty):
            continue
        counts = torch.bincount(torch.tensor(tokens, device=logits.device), minlength=logits.shape[-1]).to(logits.dtype)
        logits[row] -= option.frequency_penalty * counts + option.presence_penalty * (counts > 0)


def _sample(
    logits: torch.Tensor, options: Sequence[SamplingOptions], generator: torch.Generator | None = None
) -> torch.Tensor:
    vocabulary = logits.shape[-1]
    logits = logits / _column([o.temperature for o in options], logits)
    ordered, order = logits.sort(dim=-1, descending=True)
    top_k = _column([o.top_k if 0 < o.top_k < vocabulary else vocabulary for o in options], logits)
    ranks = torch.arange(vocabulary, device=logits.device).unsqueeze(0)
    ordered = ordered.masked_fill(ranks >= top_k, float("-inf"))
    # top_p 1 is "off": a float32 cumsum can pass 1.0 early and drop the unlikeliest tokens.
    top_p = _column([o.top_p if o.top_p < 1 else float("inf") for o in options], logits)
    probabilities = ordered.softmax(dim=-1)
    # Drop a token once the more likely ones already reach top_p; the first always stays.
    ordered = ordered.masked_fill(probabilities.cumsum(dim=-1) - probabilities >= top_p, float("-inf"))
    picks = torch.multinomial(ordered.softmax(dim=-1), num_samples=1, generator=generator)
    return order.gather(-1, picks).squeeze(1)


def _column(values: list[float], like: torch.Tensor) -> torch.Tensor:
    """One value per row, shaped to broadcast across the vocabulary."""
    return torch.tensor(values, dtype=like.dtype, device=like.device).unsqueeze(1)
