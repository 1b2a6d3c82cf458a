"""The OpenAI-compatible API over the one service path.

OpenAI's wire types (``server.protocol.openai``) -> a ``GenerationRequest``; a
``PendingGeneration``'s results -> OpenAI's responses and stream chunks, shaped as vLLM's
OpenAI server shapes them (``vllm/entrypoints/openai``). Defaults are OpenAI's:
temperature 1, max_tokens 16 for completions and the room the context leaves for chat,
an explicit max_tokens cut to that room (as vLLM does) rather than refused.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from typing import TypeVar

from server.engines import TokenLogprob
from server.errors import InvalidRequestError
from server.protocol import openai as oa
from server.service.generation import ChoiceDelta, GenerationResult, PendingGeneration
from server.service.requests import (
    ChatMessage,
    ChatPrompt,
    GenerationRequest,
    ImagePart,
    Prompt,
    SamplingRequest,
    TextPart,
    TextPrompt,
    TokenPrompt,
)

# OpenAI's default temperature, which vLLM's server applies too.
DEFAULT_TEMPERATURE = 1.0
# What a log-probability of -inf is sent as: JSON has no infinity (OpenAI's and vLLM's value).
LOGPROB_FLOOR = -9999.0

Chunk = TypeVar("Chunk", oa.TextCompletionResponse, oa.ChatCompletionChunk)


# ----- requests ---------------------------------------------------------------------------


def completion_generation(body: oa.TextCompletionRequest) -> GenerationRequest:
    """``POST /v1/completions`` -> the service's request."""
    _check_common(body)
    return GenerationRequest(
        model=body.model,
        prompts=_completion_prompts(body.prompt),
        sampling=_sampling(body, max_tokens=body.max_tokens, logprobs=body.logprobs),
        n=body.n,
        echo=body.echo,
        id_prefix="cmpl",
    )


def chat_generation(body: oa.ChatCompletionRequest) -> GenerationRequest:
    """``POST /v1/chat/completions`` -> the service's request."""
    _check_common(body)
    if body.top_logprobs and not body.logprobs:
        raise InvalidRequestError("top_logprobs needs logprobs set to true", param="top_logprobs")
    if body.max_tokens is not None and body.max_completion_tokens not in (None, body.max_tokens):
        raise InvalidRequestError(
            "max_tokens and max_completion_tokens name one limit; send one of them", param="max_tokens"
        )
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    return GenerationRequest(
        model=body.model,
        prompts=(ChatPrompt(tuple(_chat_message(index, message) for index, message in enumerate(body.messages))),),
        sampling=_sampling(body, max_tokens=max_tokens, logprobs=(body.top_logprobs or 0) if body.logprobs else None),
        n=body.n,
        id_prefix="chatcmpl",
    )


def _check_common(body: oa.TextCompletionRequest | oa.ChatCompletionRequest) -> None:
    unsupported = body.unsupported_fields()
    if unsupported:
        names = ", ".join(unsupported)
        raise InvalidRequestError(
            f"unsupported field(s): {names}; this server does not implement {'it' if len(unsupported) == 1 else 'them'}",
            param=unsupported[0],
        )
    if body.stream_options is not None and not body.stream:
        raise InvalidRequestError("stream_options can only be given when stream is true", param="stream_options")


def _sampling(
    body: oa.TextCompletionRequest | oa.ChatCompletionRequest, *, max_tokens: int | None, logprobs: int | None
) -> SamplingRequest:
    return SamplingRequest(
        temperature=DEFAULT_TEMPERATURE if body.temperature is None else body.temperature,
        max_tokens=max_tokens,
        # Chat without max_tokens may fill the context, as in OpenAI's and vLLM's servers.
        default_max_tokens="context",
        cut_max_tokens=True,
        top_p=body.top_p,
        top_k=body.top_k,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        stop=body.stop_sequences(),
        seed=body.seed,
        logprobs=logprobs,
        logit_bias=body.token_biases(),
        ignore_eos=body.ignore_eos,
    )


def _completion_prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> tuple[Prompt, ...]:
    """A string, a list of strings, a list of token IDs (one prompt) or a list of token-ID lists."""
    if isinstance(prompt, str):
        return (TextPrompt(prompt),)
    prompts: list[Prompt] = []
    tokens: list[int] = []
    for item in prompt:
        if isinstance(item, str):
            prompts.append(TextPrompt(item))
        elif isinstance(item, int):
            tokens.append(item)
        else:
            prompts.append(TokenPrompt(tuple(item)))
    return (TokenPrompt(tuple(tokens)),) if tokens else tuple(prompts)


def _chat_message(index: int, message: oa.SystemMessage | oa.UserMessage | oa.AssistantMessage) -> ChatMessage:
    content = message.content
    if content is None or isinstance(content, str):
        return ChatMessage(message.role, content or "", message.name)
    parts: list[TextPart | ImagePart] = []
    for number, part in enumerate(content):
        if isinstance(part, oa.TextContent):
            parts.append(TextPart(part.text))
        else:
            parts.append(ImagePart(part.image_url.url, f"messages[{index}].content[{number}].image_url"))
    return ChatMessage(message.role, tuple(parts), message.name)


# ----- responses --------------------------------------------------------------------------


def _usage_chunk(
    kind: type[Chunk], object_name: str, pending: PendingGeneration, completion_tokens: list[int]
) -> Chunk:
    """The stream's last chunk where ``include_usage`` asks for it: no choices, the totals."""
    return kind.model_construct(
        id=pending.request_id,
        object=object_name,
        created=pending.created,
        model=pending.model_id,
        choices=[],
        usage=_usage(pending.prompt_tokens, sum(completion_tokens)),
    )


def _usage(prompt_tokens: int, completion_tokens: int) -> oa.UsageInfo:
    return oa.UsageInfo.model_construct(
        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens
    )


def completion_response(pending: PendingGeneration, result: GenerationResult) -> oa.TextCompletionResponse:
    return oa.TextCompletionResponse(
        id=pending.request_id,
        created=pending.created,
        model=pending.model_id,
        choices=[
            oa.CompletionChoice(
                index=choice.index,
                text=choice.text,
                logprobs=None if choice.logprobs is None else completion_logprobs(choice.logprobs)[0],
                finish_reason=choice.finish_reason,
            )
            for choice in result.choices
        ],
        usage=_usage(result.prompt_tokens, result.completion_tokens),
    )


async def completion_chunks(
    pending: PendingGeneration, body: oa.TextCompletionRequest
) -> AsyncIterator[oa.TextCompletionResponse]:
    """The stream's chunks, one per choice's delta, then the usage chunk where asked for.

    Dumped with ``exclude_unset``, each carries the fields vLLM's server sends.
    """
    include_usage, continuous = _usage_options(body.stream_options)
    wants_logprobs = body.logprobs is not None
    offsets = [0] * pending.choice_count
    completion_tokens = [0] * pending.choice_count
    async with aclosing(pending.stream()) as deltas:
        async for delta in deltas:
            completion_tokens[delta.index] = delta.completion_tokens
            if _says_nothing(delta):
                continue
            logprobs = None
            if wants_logprobs:
                logprobs, offsets[delta.index] = completion_logprobs(delta.logprobs or (), offsets[delta.index])
            choice = oa.CompletionChoice.model_construct(
                index=delta.index, text=delta.text, logprobs=logprobs, finish_reason=delta.finish_reason
            )
            chunk = oa.TextCompletionResponse.model_construct(
                id=pending.request_id,
                object="text_completion",
                created=pending.created,
                model=pending.model_id,
                choices=[choice],
            )
            if continuous:
                chunk.usage = _usage(delta.prompt_tokens, delta.completion_tokens)
            yield chunk
    if include_usage:
        yield _usage_chunk(oa.TextCompletionResponse, "text_completion", pending, completion_tokens)


def chat_response(
    pending: PendingGeneration, result: GenerationResult, body: oa.ChatCompletionRequest
) -> oa.ChatCompletionResponse:
    return oa.ChatCompletionResponse(
        id=pending.request_id,
        created=pending.created,
        model=pending.model_id,
        choices=[
            oa.ChatChoice(
                index=choice.index,
                message=oa.ChatResponseMessage(content=choice.text),
                logprobs=None if choice.logprobs is None else chat_logprobs(choice.logprobs, body.top_logprobs or 0),
                finish_reason=choice.finish_reason,
            )
            for choice in result.choices
        ],
        usage=_usage(result.prompt_tokens, result.completion_tokens),
    )


async def chat_chunks(
    pending: PendingGeneration, body: oa.ChatCompletionRequest
) -> AsyncIterator[oa.ChatCompletionChunk]:
    """Per choice: a first chunk with the role (sent with its first text, as vLLM does, so
    it does not arrive before the model has produced anything), its text chunks, and a
    last chunk with its finish_reason; then the usage chunk where asked for."""
    include_usage, continuous = _usage_options(body.stream_options)
    started = [False] * pending.choice_count
    completion_tokens = [0] * pending.choice_count
    async with aclosing(pending.stream()) as deltas:
        async for delta in deltas:
            completion_tokens[delta.index] = delta.completion_tokens
            if _says_nothing(delta):
                continue
            if not started[delta.index]:
                started[delta.index] = True
                role = oa.ChatDelta.model_construct(role="assistant", content="")
                yield _chat_chunk(pending, delta, role, None, None)
            content = oa.ChatDelta.model_construct(content=delta.text) if delta.text else oa.ChatDelta.model_construct()
            logprobs = chat_logprobs(delta.logprobs or (), body.top_logprobs or 0) if body.logprobs else None
            chunk = _chat_chunk(pending, delta, content, logprobs, delta.finish_reason)
            if continuous:
                chunk.usage = _usage(delta.prompt_tokens, delta.completion_tokens)
            yield chunk
    if include_usage:
        yield _usage_chunk(oa.ChatCompletionChunk, "chat.completion.chunk", pending, completion_tokens)


def _chat_chunk(
    pending: PendingGeneration,
    delta: ChoiceDelta,
    message: oa.ChatDelta,
    logprobs: oa.ChatChoiceLogprobs | None,
    finish_reason: str | None,
) -> oa.ChatCompletionChunk:
    choice = oa.ChatChunkChoice.model_construct(
        index=delta.index, delta=message, logprobs=logprobs, finish_reason=finish_reason
    )
    return oa.ChatCompletionChunk.model_construct(
        id=pending.request_id,
        object="chat.completion.chunk",
        created=pending.created,
        model=pending.model_id,
        choices=[choice],
    )


def _says_nothing(delta: ChoiceDelta) -> bool:
    """A delta with no text, no token and no end (a character still incomplete) is not sent."""
    return not delta.text and not delta.logprobs and delta.finish_reason is None


def _usage_options(options: oa.StreamOptions | None) -> tuple[bool, bool]:
    if options is None:
        return False, False
    include = bool(options.include_usage)
    return include, include and bool(options.continuous_usage_stats)


# ----- log-probabilities ------------------------------------------------------------------


def _floor(logprob: float) -> float:
    return max(logprob, LOGPROB_FLOOR)


def completion_logprobs(entries: Sequence[TokenLogprob], offset: int = 0) -> tuple[oa.CompletionLogprobs, int]:
    """Completions' logprobs for ``entries``, their text offsets counted from ``offset``;
    returns them with the offset after the last token.

    As vLLM's server: ``top_logprobs`` maps the chosen token and the likeliest ones to their
    log-probabilities (so up to N+1 entries); an offset advances by the length of each
    token's text decoded alone. Where several tokens decode to one text (byte tokens of an
    incomplete character decode to ""), its key holds the chosen token's log-probability,
    else the likeliest one's (vLLM's keeps the last, the least likely).
    """
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []
    for entry in entries:
        tokens.append(entry.token)
        text_offset.append(offset)
        offset += len(entry.token)
        if entry.logprob is None:
            token_logprobs.append(None)
            top_logprobs.append(None)
            continue
        token_logprobs.append(_floor(entry.logprob))
        top = {entry.token: _floor(entry.logprob)}
        for other in entry.top:
            # Tokens that decode alike share a key: the chosen token's stays, else the likeliest's.
            top.setdefault(other.token, _floor(other.logprob))
        top_logprobs.append(top)
    logprobs = oa.CompletionLogprobs.model_construct(
        text_offset=text_offset, token_logprobs=token_logprobs, tokens=tokens, top_logprobs=top_logprobs
    )
    return logprobs, offset


def chat_logprobs(entries: Sequence[TokenLogprob], top: int) -> oa.ChatChoiceLogprobs:
    """Chat's ``logprobs.content``: per token its text, log-probability and UTF-8 bytes, and
    the ``top`` likeliest tokens at its position, likeliest first."""
    content = [
        oa.ChatTokenLogprob.model_construct(
            token=entry.token,
            logprob=LOGPROB_FLOOR if entry.logprob is None else _floor(entry.logprob),
            bytes=_utf8(entry.token),
            top_logprobs=[
                oa.ChatLogprob.model_construct(
                    token=other.token, logprob=_floor(other.logprob), bytes=_utf8(other.token)
                )
                for other in entry.top[:top]
            ],
        )
        for entry in entries
    ]
    return oa.ChatChoiceLogprobs.model_construct(content=content)


def _utf8(text: str) -> list[int]:
    return list(text.encode("utf-8", errors="replace"))
