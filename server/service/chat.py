"""``POST /v4/chat-completions`` over the one service path.

The hosted contract's chat request (``server.protocol.v4.ChatCompletionRequest``) becomes
the service's ``GenerationRequest``: the conversation, cut to its last ``k`` messages by
a ``last_k`` memory strategy, after the ``instructions`` as a system message, as one
``ChatPrompt`` rendered with the model's chat template; ``model_parameters`` mean what they
mean for ``/v4/completions`` (``v4_sampling``). From there it is the path every request
takes (``CompletionService.prepare_generation``): registry, images and their pixel budget,
admission, engine lease, context checks, usage log. Answers and stream chunks are the
SDK's ``ChatCompletionsResponse``.

A request's own ``chat_template`` is rendered by ``TemplateRenderer`` (a sandbox in a worker
process: see ``server.service.chat_template``) with the ``messages``, the model's
``bos_token`` and ``eos_token`` (read from its tokenizer's files) and
``add_generation_prompt``; the text goes to the engine as rendered, without another BOS.
``CompletionService.prepare_generation`` has no way yet to take a rendered prompt that
must not get special tokens, so ``_prepare_rendered`` takes the steps of that path here,
through the same helpers (see its docstring).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from pathlib import Path
from typing import Any

from server import telemetry
from server.errors import InvalidRequestError
from server.pool import EnginePool, PreparedRequest
from server.protocol import v4
from server.registry import ModelEntry, VisionSettings
from server.service.chat_template import TemplateRenderer
from server.service.completions import CompletionService, _check_request
from server.service.generation import Choice, PendingGeneration
from server.service.placeholders import count_placeholders, placeholder
from server.service.prompts import EnginePrompt
from server.service.requests import ChatMessage, ChatPrompt, GenerationRequest, ImagePart, TextPart
from server.service.sampling import sampling_options, v4_sampling
from server.weights import is_present, resolve_source

logger = logging.getLogger(__name__)

ID_PREFIX = "chatcmpl"
# The tokenizer's special tokens a chat template is given, as transformers gives them.
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")


class PendingChat:
    """A ``/v4/chat-completions`` request whose tokens have not been generated yet; its owner
    must ``close`` it however the request ends (it holds the engine lease)."""

    def __init__(self, pending: PendingGeneration):
        self._pending = pending
        self.request_id = pending.request_id

    def close(self) -> None:
        self._pending.close()

    async def result(self) -> v4.ChatCompletionsResponse:
        result = await self._pending.result()
        (choice,) = result.choices
        usage = _usage(choice.prompt_tokens, choice.completion_tokens)
        return v4.chat_completions_response(choice.text, choice.finish_reason, usage)

    async def chunks(self) -> AsyncIterator[v4.ChatCompletionsResponse]:
        """One chunk per engine step, its text the step's; the last carries the finish
        reason and the token usage, as ``/v4/completions`` streams."""
        async with aclosing(self._pending.stream()) as deltas:
            async for delta in deltas:
                final = delta.finish_reason is not None
                usage = _usage(delta.prompt_tokens, delta.completion_tokens) if final else None
                yield v4.chat_completions_response(delta.text, delta.finish_reason, usage)


def _usage(prompt: int, completion: int) -> v4.TokenUsage:
    return v4.TokenUsage.model_construct(prompt=prompt, completion=completion, total=prompt + completion)


# ----- the request -----------------------------------------------------------------------


def conversation(body: v4.ChatCompletionRequest) -> tuple[ChatMessage, ...]:
    """The messages the model sees: the last ``k`` (``memory_strategy``), after the
    ``instructions`` as a system message. Image parts name where the caller put them."""
    messages = [_message(index, message) for index, message in enumerate(body.messages)]
    if body.memory_strategy is not None:
        messages = messages[-body.memory_strategy.params.k :]
    if body.instructions:
        if any(message.role == "system" for message in body.messages):
            raise InvalidRequestError(
                "send the system prompt either as instructions or as a system message, not both",
                param="instructions",
            )
        messages.insert(0, ChatMessage("system", body.instructions))
    return tuple(messages)


def _message(index: int, message: v4.ChatUserMessage | v4.ChatAssistantMessage | v4.ChatSystemMessage) -> ChatMessage:
    if isinstance(message.content, str):
        return ChatMessage(message.role, message.content)
    parts: list[TextPart | ImagePart] = []
    for number, part in enumerate(message.content):
        where = f"messages[{index}].content[{number}]"
        if isinstance(part, v4.ChatText):
            parts.append(TextPart(part.text))
        elif isinstance(part, v4.ChatImageURLPart):
            parts.append(ImagePart(part.image_url.url, f"{where}.image_url"))
        else:
            parts.append(ImagePart(part.image_data.data_url(), f"{where}.image_data"))
    return ChatMessage(message.role, tuple(parts))


def chat_generation(body: v4.ChatCompletionRequest) -> GenerationRequest:
    return GenerationRequest(
        model=body.model,
        prompts=(ChatPrompt(conversation(body)),),
        sampling=v4_sampling(body.model_parameters),
        id_prefix=ID_PREFIX,
    )


# ----- the service -----------------------------------------------------------------------


class ChatCompletions:
    """``/v4/chat-completions``: the completions service, and the renderer of request templates."""

    def __init__(
        self, service: CompletionService, pool: EnginePool, home: Path, renderer: TemplateRenderer | None = None
    ):
        self._service = service
        self._pool = pool
        self._home = home
        self._renderer = renderer or TemplateRenderer()

    async def prepare(self, body: v4.ChatCompletionRequest, account_id: str | None = None) -> PendingChat:
        """``account_id`` as ``CompletionService.prepare`` takes it (the HTTP layer decides)."""
        generation = chat_generation(body)
        if body.chat_template is None:
            return PendingChat(await self._service.prepare_generation(generation, account_id))
        return PendingChat(await self._prepare_rendered(generation, body.chat_template, account_id))

    async def close(self) -> None:
        await self._renderer.close()

    async def _prepare_rendered(
        self, request: GenerationRequest, template: str, account_id: str | None
    ) -> PendingGeneration:
        """``prepare_generation``'s steps for one conversation rendered with ``template``:
        the same checks, image reading and decoding within the pixel budget, sampling
        options, lease and engine input, through the same helpers; only the prompt differs
        (rendered here, tokenized without special tokens). The template is rendered before
        the lease when the model's tokenizer is on this machine, so a broken template
        costs no engine load and no place in the model's queue.

        To fold into ``prepare_generation`` once it takes a rendered prompt (a ``TextPrompt``
        with ``add_special_tokens=False``) and engines report their special tokens.
        """
        registered = self._pool.lookup(request.model)
        telemetry.serving(registered.model_id, account_id)
        entry = registered.entry
        _check_request(request)
        (prompt,) = request.prompts
        assert isinstance(prompt, ChatPrompt)
        images = await self._service._images(request, entry)
        options = sampling_options(request.sampling, entry)
        vision = entry.vision if images else None
        render = functools.partial(self._render, template, prompt.messages, registered.model_id, vision, len(images))
        text = await render(present_only=True)
        lease = await self._pool.lease(request.model)
        try:
            if text is None:
                text = await render(present_only=False)
            assert text is not None
            adapter = registered.model_id if entry.is_adapter else None
            prepared: PreparedRequest = await self._service._engine_input(
                lease.engine, EnginePrompt(text, add_special_tokens=False), options, adapter, images
            )
        except BaseException:
            lease.release()
            raise
        request_id = telemetry.engine_request_id(request.id_prefix)
        return PendingGeneration(
            lease,
            [Choice(index=0, prompt_index=0, request=prepared, request_id=request_id)],
            request_id=request_id,
            model_id=registered.model_id,
            account_id=account_id,
            logprobs=False,
            echo_only=False,
            created=int(time.time()),
        )

    async def _render(
        self,
        template: str,
        messages: Sequence[ChatMessage],
        model_id: str,
        vision: VisionSettings | None,
        images: int,
        *,
        present_only: bool,
    ) -> str | None:
        """The conversation rendered with ``template``. None if ``present_only`` and the
        model's tokenizer is not on this machine yet (loading its engine fetches it)."""
        tokens = await self._special_tokens(model_id, present_only=present_only)
        if tokens is None:
            return None
        context: dict[str, Any] = {
            "messages": _template_messages(messages, vision),
            "add_generation_prompt": True,
            **tokens,
        }
        text = await self._renderer.render(template, context)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidRequestError(
                "the chat template's output is not valid Unicode text (an unpaired surrogate)", param="chat_template"
            ) from None
        if vision is not None and count_placeholders(text, vision) != images:
            raise InvalidRequestError(
                f"the chat template's output holds {count_placeholders(text, vision)} image placeholder(s) "
                f"({vision.placeholder}) but {images} image(s) were sent: it must print each message's content, "
                "where each image part is a placeholder",
                param="chat_template",
            )
        return text

    async def _special_tokens(self, model_id: str, *, present_only: bool) -> dict[str, str] | None:
        entry = self._tokenizer_entry(model_id)
        source = entry.tokenizer or entry.source
        revision = None if entry.tokenizer else entry.revision
        if source is None:
            return {}
        if not await asyncio.to_thread(is_present, source, self._home, revision=revision):
            if present_only:
                return None
            logger.warning(
                "model %s: its tokenizer's files are not here; the chat template gets no special tokens", model_id
            )
            return {}
        directory = await asyncio.to_thread(resolve_source, source, self._home, revision=revision)
        return dict(await asyncio.to_thread(_read_special_tokens, directory))

    def _tokenizer_entry(self, model_id: str) -> ModelEntry:
        """The entry whose tokenizer tokenizes ``model_id``'s prompts: a LoRA adapter's base's."""
        entry = self._pool.lookup(model_id).entry
        if entry.base is not None:
            return self._pool.lookup(entry.base).entry
        return entry


def _template_messages(messages: Sequence[ChatMessage], vision: VisionSettings | None) -> list[dict[str, str]]:
    """Messages as a request template sees them: role and content, a string. Text parts
    join with newlines; image parts become the model's placeholders (numbered in order)
    where a vision model gets images, else nothing."""
    numbers = iter(range(1, 1 + sum(isinstance(p, ImagePart) for m in messages for p in m.content)))
    rendered = []
    for message in messages:
        if isinstance(message.content, str):
            content = message.content
        else:
            texts = []
            for part in message.content:
                if isinstance(part, TextPart):
                    texts.append(part.text)
                elif vision is not None:
                    texts.append(placeholder(vision, next(numbers)))
            content = "\n".join(texts)
        rendered.append({"role": message.role, "content": content})
    return rendered


@functools.lru_cache(maxsize=64)
def _read_special_tokens(directory: str) -> tuple[tuple[str, str], ...]:
    """The special tokens a Hugging Face tokenizer in ``directory`` declares, as text:
    ``tokenizer_config.json``'s, else ``special_tokens_map.json``'s; a missing one is ""."""
    found: dict[str, str] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = Path(directory) / name
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(config, dict):
            continue
        for key in SPECIAL_TOKENS:
            value = config.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                found[key] = value
    return tuple((key, found.get(key, "")) for key in SPECIAL_TOKENS)
