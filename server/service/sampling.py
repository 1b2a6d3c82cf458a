"""Contract ``model_parameters`` -> engine sampling options, in one place.

Defaults are the hosted API's: temperature 0.2 (0 is greedy), max_tokens from the
registry entry (the hosted API applies 100 to open models), top-k and top-p off.
"""

from __future__ import annotations

from server.pool import SamplingOptions
from server.protocol.v4 import ModelParameters
from server.registry import ModelEntry


def sampling_options(params: ModelParameters, entry: ModelEntry) -> SamplingOptions:
    return SamplingOptions(
        max_tokens=params.max_tokens if params.max_tokens is not None else entry.default_max_tokens,
        # A default max_tokens is cut to fit the context; an explicit one is the caller's
        # promise and is refused if it cannot be kept.
        strict_max_tokens=params.max_tokens is not None,
        temperature=params.temperature,
        top_p=1.0 if params.top_p is None else params.top_p,
        top_k=0 if params.top_k in (None, -1) else params.top_k,
        presence_penalty=params.presence_penalty or 0.0,
        frequency_penalty=params.frequency_penalty or 0.0,
        stop=tuple(params.stop_sequences or ()),
    )
