"""Contract rules every engine applies the same way, whatever runs the model.

A caller must not be able to tell engines apart by their errors: the context-length
check and chat rendering are written once here rather than once per engine.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from jinja2 import TemplateError

from server.engines.base import SamplingOptions
from server.errors import InvalidRequestError


def fit_to_context(model_id: str, max_model_len: int, prompt_tokens: int, sampling: SamplingOptions) -> SamplingOptions:
    """Check that prompt plus max_tokens fits the context, as the contract demands.

    A max_tokens the caller asked for is refused when it cannot fit; a default one is
    cut to the room left, so a long prompt without max_tokens still gets an answer.
    """
    room = max_model_len - prompt_tokens
    if room < 1:
        raise InvalidRequestError(
            f"the prompt is {prompt_tokens} tokens long, but model '{model_id}' has a "
            f"context length of {max_model_len} tokens, which leaves no room to generate",
            param="prompt",
        )
    if sampling.max_tokens <= room:
        return sampling
    if sampling.strict_max_tokens:
        raise InvalidRequestError(
            f"prompt ({prompt_tokens} tokens) plus max_tokens ({sampling.max_tokens}) exceeds "
            f"the context length of model '{model_id}' ({max_model_len} tokens); "
            f"ask for at most {room} tokens",
            param="model_parameters.max_tokens",
        )
    return dataclasses.replace(sampling, max_tokens=room)


def render_chat(tokenizer: Any, model_id: str, messages: Sequence[dict[str, Any]], template: str | None = None) -> str:
    """A conversation rendered with the model's own template, ready to generate.

    ``template`` replaces the tokenizer's (a vision model's processor may carry its own).
    A registry entry can ask for ``prompt_format: chat`` on a model that has no
    template; that is the operator's mistake, reported to the caller in words. A template
    that cannot render the messages (many reject content given as a list of parts) is
    reported the same way rather than as a server failure.
    """
    if not (template or getattr(tokenizer, "chat_template", None)):
        raise InvalidRequestError(
            f"model '{model_id}' is registered with prompt_format: chat, but its tokenizer has no chat template"
        )
    try:
        rendered: str = tokenizer.apply_chat_template(
            list(messages), chat_template=template, tokenize=False, add_generation_prompt=True
        )
    except (TemplateError, TypeError) as exc:
        raise InvalidRequestError(f"the chat template of model '{model_id}' cannot render this prompt ({exc})") from exc
    return rendered
