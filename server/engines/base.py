"""The interface every engine offers the pool and the service.

Engines work in token-level terms the contract does not know about (request IDs, token
counts, chat templates); the service above them translates. A request is served in two
steps, ``prepare`` then ``generate``, so every error that can be found before the first
token (prompt too long, bad parameter) is raised while the HTTP status can still be
chosen, even for a streaming request.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import PIL.Image


@dataclass(frozen=True, slots=True)
class SamplingOptions:
    max_tokens: int
    temperature: float
    top_p: float = 1.0
    top_k: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    # When False, max_tokens was a default rather than the caller's request: it is cut
    # to the room left in the context instead of rejecting the request.
    strict_max_tokens: bool = True
    # A seed makes sampling repeatable: the same request with the same seed draws the same tokens.
    seed: int | None = None
    # Log-probabilities: None computes none; N >= 0 gives each generated token's own and
    # the N likeliest alternatives at its position (``GenerationDelta.logprobs``).
    logprobs: int | None = None
    # The same for the prompt's tokens (``GenerationDelta.prompt_logprobs``, once).
    prompt_logprobs: int | None = None
    # (token ID, bias) pairs added to the logits before sampling, as OpenAI's logit_bias.
    logit_bias: tuple[tuple[int, float], ...] = ()
    # Generate past the end-of-sequence token, up to max_tokens.
    ignore_eos: bool = False

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs is not None or self.prompt_logprobs is not None


@dataclass(frozen=True, slots=True)
class AdapterRef:
    """A LoRA adapter that a base model's engine serves beside the base itself.

    An adapter has no engine of its own: the pool starts the base's engine with every
    adapter registered on that base, and a request picks one by ``name``, the adapter's
    public model ID.
    """

    name: str
    path: str  # the local directory of its weights
    rank: int  # LoRA rank r, from its adapter_config.json


@dataclass(frozen=True, slots=True)
class LaunchOptions:
    """How the pool wants an engine started: where, with how much memory, and whether
    it may be put to sleep instead of being unloaded."""

    visible_devices: str | None = None  # CUDA_VISIBLE_DEVICES for the engine's processes
    memory_share: float | None = None  # share of each device, when the entry names no size
    enable_sleep: bool = False


@dataclass(slots=True)
class PreparedRequest:
    """A tokenized, validated request, ready for ``Engine.generate``.

    One prepared request may be generated from several times (a request for ``n``
    completions of one prompt), each time with its own sampling options.
    """

    prompt_tokens: int
    sampling: SamplingOptions
    engine_input: Any = field(repr=False)
    adapter: str | None = None
    # The prompt's token IDs as the model sees them (special tokens and image tokens included).
    prompt_token_ids: Sequence[int] = field(default=(), repr=False)


@dataclass(frozen=True, slots=True)
class TopLogprob:
    """One of the likeliest tokens at a position."""

    token_id: int
    token: str  # the token's text, decoded alone
    logprob: float


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A token the sequence holds, with its log-probability given the tokens before it.

    Log-probabilities are the model's own (log-softmax of its raw logits), before any
    temperature, penalty or bias changed the sampling distribution: what OpenAI's and
    vLLM's APIs return.
    """

    token_id: int
    token: str
    logprob: float | None  # None for a prompt's first token, which nothing predicts
    rank: int | None = None  # 1 for the likeliest token
    top: tuple[TopLogprob, ...] = ()  # the likeliest tokens at this position, likeliest first


@dataclass(frozen=True, slots=True)
class GenerationDelta:
    """Text produced since the previous delta, with running token counts."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None = None
    # The tokens produced since the previous delta, where the engine reports them.
    token_ids: tuple[int, ...] = ()
    # With ``SamplingOptions.logprobs``: one entry per token of ``token_ids``.
    logprobs: tuple[TokenLogprob, ...] | None = None
    # With ``SamplingOptions.prompt_logprobs``: one entry per prompt token, on one delta.
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None


@dataclass(frozen=True, slots=True)
class EngineStats:
    running: int
    # The most sequences one model step has served since start: proof that concurrent
    # requests share steps. None where the engine does not say (vLLM batches inside
    # its own scheduler).
    peak_batch_size: int | None = None


class Engine(ABC):
    """One loaded model, able to serve many concurrent requests."""

    model_id: str
    max_model_len: int

    @abstractmethod
    async def apply_chat_template(self, messages: Sequence[dict[str, Any]]) -> str:
        """Render a conversation with the model's own template, ready to generate.

        A message's content is a string, or a list of parts (``{"type": "text", "text":
        ...}``, ``{"type": "image"}``) for templates that place images themselves.
        A coroutine, as ``decode`` is, because the tokenizer may live in another process
        (a Ray replica's engine): waiting for it must not hold the event loop.
        """

    def has_chat_template(self) -> bool:
        """Whether ``apply_chat_template`` has a template to render with."""
        return True

    async def decode(self, token_ids: Sequence[int]) -> str:
        """Token IDs -> text, special tokens included, as vLLM echoes a token prompt."""
        raise NotImplementedError(f"{type(self).__name__} cannot decode tokens")

    @abstractmethod
    async def prepare(
        self,
        prompt: str | Sequence[int],
        sampling: SamplingOptions,
        *,
        add_special_tokens: bool = True,
        adapter: str | None = None,
        images: Sequence[PIL.Image.Image] = (),
    ) -> PreparedRequest:
        """Tokenize and validate; raises ``InvalidRequestError`` for what the model refuses.

        ``prompt`` is text, tokenized here, or token IDs, taken as they are.
        ``adapter`` names one of the ``AdapterRef`` the engine was started with; the
        prompt is tokenized by the base model's tokenizer either way. ``images`` go with a
        prompt that already holds one placeholder per image, in order.
        """

    @abstractmethod
    def generate(
        self, request: PreparedRequest, request_id: str, *, stream: bool = True
    ) -> AsyncGenerator[GenerationDelta, None]:
        """Stream deltas; the last one carries ``finish_reason``.

        With ``stream=False`` the engine may deliver the whole completion as one delta:
        a caller that wants only the result should not pay for per-token outputs.

        Closing the iterator early (a client went away) aborts the request in the engine.
        """

    @abstractmethod
    async def abort(self, request_id: str) -> None: ...

    @abstractmethod
    def stats(self) -> EngineStats: ...

    @abstractmethod
    async def shutdown(self) -> None: ...

    @property
    def alive(self) -> bool:
        """False once the engine can no longer serve (its processes died)."""
        return True

    def add_adapter(self, adapter: AdapterRef) -> bool:
        """Serve ``adapter`` from now on, beside those the engine started with, without a
        restart; False when this engine cannot (it was started without LoRA, or with
        buffers too small for the adapter's rank): its base must then be restarted.

        Taking the adapter again under its name with other weights replaces it for the
        requests that start afterwards; those already running keep the adapter they began with.
        """
        return False

    @property
    def supports_sleep(self) -> bool:
        """Whether ``sleep`` frees the engine's device memory while keeping it warm."""
        return False

    async def sleep(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot sleep")

    async def wake_up(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot sleep")
