"""What any API asks of the service, in one vocabulary.

Each API family (the hosted ``/v4`` contract, the OpenAI-compatible ``/v1`` routes) maps
its own wire types to a ``GenerationRequest``; from there one path serves them all
(``CompletionService.prepare_generation``): model lookup, images, engine lease, prompt
building, sampling options, fan-out to ``n`` completions per prompt, echo and
log-probabilities. Only the names and defaults of each API live in its own mapping.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True, slots=True)
class TextPrompt:
    """Text to continue.

    ``as_registered``: prompt the model as its registry entry says (``prompt_format``: raw,
    or wrapped as one user message in its chat template; images get placeholders), as
    the hosted ``/v4`` contract does. Otherwise the text is tokenized as written, with the
    tokenizer's special tokens (BOS), as OpenAI's and vLLM's completions endpoints do.
    """

    text: str
    as_registered: bool = False


@dataclass(frozen=True, slots=True)
class TokenPrompt:
    """Token IDs, given to the model as they are (no BOS added)."""

    token_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class TextPart:
    text: str


@dataclass(frozen=True, slots=True)
class ImagePart:
    """An image in a chat message; ``param`` says where in the request it was, for errors."""

    url: str
    param: str


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str
    content: str | tuple[TextPart | ImagePart, ...]
    name: str | None = None


@dataclass(frozen=True, slots=True)
class ChatPrompt:
    """A conversation, rendered with the model's own chat template, ready for the reply."""

    messages: tuple[ChatMessage, ...]


Prompt = TextPrompt | TokenPrompt | ChatPrompt


@dataclass(frozen=True, slots=True)
class ImageInput:
    """An image sent beside a text prompt (the ``/v4`` contract's ``images``)."""

    url: str
    param: str


# A request without max_tokens gets the registry entry's default_max_tokens ("registry",
# the hosted contract), whatever room the context leaves ("context", OpenAI's chat), or
# a fixed count (OpenAI's completions: 16). Defaults are cut to fit the context; an
# explicit max_tokens that does not fit is refused.
DefaultMaxTokens = int | Literal["registry", "context"]


@dataclass(frozen=True, slots=True)
class SamplingRequest:
    """Sampling parameters, already validated by the API's wire types. None: off or default."""

    temperature: float
    max_tokens: int | None = None
    default_max_tokens: DefaultMaxTokens = "registry"
    # An explicit max_tokens beyond the room the prompt leaves is cut to that room (vLLM's
    # OpenAI server) instead of refused (the hosted contract).
    cut_max_tokens: bool = False
    top_p: float | None = None
    top_k: int | None = None  # -1 and 0: off
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    # Log-probabilities of each generated token and of its ``logprobs`` likeliest alternatives.
    logprobs: int | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()
    # Keep generating past the end-of-sequence token, up to max_tokens (vLLM's ignore_eos).
    ignore_eos: bool = False


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    model: str
    prompts: tuple[Prompt, ...]
    sampling: SamplingRequest
    # Completions per prompt. Choice ``i`` of prompt ``p`` has index ``p * n + i``; with a
    # seed it samples with ``seed + i``, as vLLM's parallel sampling does.
    n: int = 1
    # Each choice starts with its prompt's text and, with ``logprobs``, the prompt tokens'
    # log-probabilities (the first token's is None). ``max_tokens=0`` returns only that.
    echo: bool = False
    images: tuple[ImageInput, ...] = ()  # with one TextPrompt only
    # The prefix of the request's ID (``cmpl-<hex>``), which the engine and the log use.
    id_prefix: str = "cmpl"
