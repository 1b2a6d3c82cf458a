"""The interface every engine offers the pool and the service.

Engines work in token-level terms the contract does not know about (request IDs, token
counts, chat templates); the service above them translates. A request is served in two
steps, ``prepare`` then ``generate``, so every error that can be found before the first
token (prompt too long, bad parameter) is raised while the HTTP status can still be
chosen, even for a streaming request.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any


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


@dataclass(slots=True)
class PreparedRequest:
    """A tokenized, validated request, ready for ``Engine.generate``."""

    prompt_tokens: int
    sampling: SamplingOptions
    engine_input: Any = field(repr=False)


@dataclass(frozen=True, slots=True)
class GenerationDelta:
    """Text produced since the previous delta, with running token counts."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None = None


@dataclass(frozen=True, slots=True)
class EngineStats:
    running: int


class Engine(ABC):
    """One loaded model, able to serve many concurrent requests."""

    model_id: str
    max_model_len: int

    @abstractmethod
    def apply_chat_template(self, messages: Sequence[dict[str, str]]) -> str:
        """Render a conversation with the model's own template, ready to generate."""

    @abstractmethod
    async def prepare(
        self, prompt: str, sampling: SamplingOptions, *, add_special_tokens: bool = True
    ) -> PreparedRequest:
        """Tokenize and validate; raises ``InvalidRequestError`` for what the model refuses."""

    @abstractmethod
    def generate(self, request: PreparedRequest, request_id: str) -> AsyncIterator[GenerationDelta]:
        """Stream deltas; the last one carries ``finish_reason``.

        Closing the iterator early (a client went away) aborts the request in the engine.
        """

    @abstractmethod
    async def abort(self, request_id: str) -> None: ...

    @abstractmethod
    def stats(self) -> EngineStats: ...

    @abstractmethod
    async def shutdown(self) -> None: ...
