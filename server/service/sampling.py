"""Sampling parameters -> engine sampling options, in one place for every API.

Each API names its parameters its own way (``v4_sampling`` for the hosted contract's
``model_parameters``; the OpenAI routes map theirs in ``server.service.openai``); what a
parameter means is decided only here. The hosted contract's defaults: temperature 0.2 (0 is
greedy, set by its wire type), max_tokens from the registry entry (the hosted API applies 100
to open models), top-k and top-p off.
"""

from __future__ import annotations

from server.pool import SamplingOptions
from server.protocol.v4 import MAX_ENGINE_INT, ModelParameters
from server.registry import ModelEntry
from server.service.requests import SamplingRequest


def v4_sampling(params: ModelParameters) -> SamplingRequest:
    """The hosted contract's ``model_parameters``, by their names here."""
    return SamplingRequest(
        temperature=params.temperature,
        max_tokens=params.max_tokens,
        default_max_tokens="registry",
        top_p=params.top_p,
        top_k=params.top_k,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        stop=tuple(params.stop_sequences or ()),
    )


def sampling_options(
    params: SamplingRequest, entry: ModelEntry, *, prompt_logprobs: int | None = None, echo_only: bool = False
) -> SamplingOptions:
    """``echo_only``: the request wants its prompt back and no new token (``max_tokens=0``
    with echo); the engine still has to run one step for the prompt's log-probabilities."""
    if echo_only:
        max_tokens, strict = 1, False
    elif params.max_tokens is not None:
        # An explicit max_tokens is the caller's promise and is refused if it cannot be kept,
        # unless the API cuts it to fit.
        max_tokens, strict = params.max_tokens, not params.cut_max_tokens
    elif params.default_max_tokens == "registry":
        max_tokens, strict = entry.default_max_tokens, False
    elif params.default_max_tokens == "context":
        # Cut to the room the prompt leaves in the context.
        max_tokens, strict = MAX_ENGINE_INT, False
    else:
        max_tokens, strict = params.default_max_tokens, False
    return SamplingOptions(
        max_tokens=max_tokens,
        strict_max_tokens=strict,
        temperature=params.temperature,
        top_p=1.0 if params.top_p is None else params.top_p,
        top_k=0 if params.top_k in (None, -1) else params.top_k,
        presence_penalty=params.presence_penalty or 0.0,
        frequency_penalty=params.frequency_penalty or 0.0,
        stop=params.stop,
        seed=params.seed,
        logprobs=params.logprobs,
        prompt_logprobs=prompt_logprobs,
        logit_bias=params.logit_bias,
        ignore_eos=params.ignore_eos,
    )
