"""Turning a request's prompt into what the engine tokenizes.

A ``TextPrompt`` of the hosted contract goes as its registry entry says (below); an
OpenAI completions prompt goes as written, token IDs as they are, and a conversation
through the model's chat template (``build_chat``).

The hosted API sends open models the prompt as written (``raw``). An entry registered
with ``prompt_format: chat`` has the prompt wrapped as one user message and rendered
with the model's own chat template, which already carries the BOS token, so the
tokenizer must not add another.

With images, the text must also hold one placeholder per image (``placeholders``). A
chat template that knows image parts places them itself, as the model was trained; one
that does not (it rejects a list of parts, or drops the images) gets the placeholders
in the text of the message instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from server.errors import InvalidRequestError
from server.pool import Engine
from server.registry import ModelEntry, VisionSettings
from server.service.placeholders import count_placeholders, placeholder, with_placeholders
from server.service.requests import ChatMessage, ChatPrompt, ImagePart, Prompt, TextPart, TokenPrompt


@dataclass(frozen=True, slots=True)
class BuiltPrompt:
    text: str
    add_special_tokens: bool


async def build_prompt(prompt: str, entry: ModelEntry, engine: Engine, *, images: int = 0) -> BuiltPrompt:
    """``images``: how many images go with the prompt (the service sends them only to
    vision entries). Without images a vision model's prompt is left as written."""
    vision = entry.vision if images else None
    if entry.prompt_format == "chat":
        return BuiltPrompt(text=await _chat(prompt, vision, images, engine), add_special_tokens=False)
    text = prompt if vision is None else with_placeholders(prompt, vision, images)
    return BuiltPrompt(text=text, add_special_tokens=True)


async def _chat(prompt: str, vision: VisionSettings | None, images: int, engine: Engine) -> str:
    if vision is None:
        return await engine.apply_chat_template([{"role": "user", "content": prompt}])
    if not count_placeholders(prompt, vision):
        parts = [{"type": "image"}] * images + [{"type": "text", "text": prompt}]
        try:
            text = await engine.apply_chat_template([{"role": "user", "content": parts}])
        except InvalidRequestError:
            text = None
        if text is not None and count_placeholders(text, vision) == images:
            return text
    content = with_placeholders(prompt, vision, images)
    return await engine.apply_chat_template([{"role": "user", "content": content}])


async def engine_prompt(prompt: Prompt, entry: ModelEntry, engine: Engine, *, images: int = 0) -> EnginePrompt:
    """What the engine tokenizes (text) or takes as it is (token IDs), and whether the
    tokenizer adds its special tokens. ``images``: how many images go with the prompt."""
    if isinstance(prompt, TokenPrompt):
        return EnginePrompt(prompt.token_ids, add_special_tokens=False)
    if isinstance(prompt, ChatPrompt):
        return EnginePrompt(await build_chat(prompt.messages, entry, engine, images=images), add_special_tokens=False)
    if prompt.as_registered:
        built = await build_prompt(prompt.text, entry, engine, images=images)
        return EnginePrompt(built.text, add_special_tokens=built.add_special_tokens)
    return EnginePrompt(prompt.text, add_special_tokens=True)


@dataclass(frozen=True, slots=True)
class EnginePrompt:
    prompt: str | tuple[int, ...]
    add_special_tokens: bool


async def build_chat(messages: Sequence[ChatMessage], entry: ModelEntry, engine: Engine, *, images: int = 0) -> str:
    """A conversation rendered with the model's chat template (a vision model's may be its
    processor's), ready for the assistant's reply.

    Image parts go to the template as ``{"type": "image"}`` parts, so a template that knows
    images places them as the model was trained. Where the template cannot (it rejects a
    list of parts, or drops the images), each message's images become placeholders in its
    text instead, one a line where the image was.
    """
    if not engine.has_chat_template():
        raise InvalidRequestError(
            f"model '{engine.model_id}' has no chat template (its tokenizer defines none), so it cannot "
            "answer a conversation; send it a plain text prompt instead",
            param="messages",
        )
    vision = entry.vision if images else None
    if vision is None:
        return await engine.apply_chat_template([_message(m, _text_only) for m in messages])
    try:
        text: str | None = await engine.apply_chat_template([_message(m, _parts) for m in messages])
    except InvalidRequestError:
        text = None
    if text is not None and count_placeholders(text, vision) == images:
        return text
    numbers = iter(range(1, images + 1))

    def inline(parts: Sequence[TextPart | ImagePart]) -> str:
        return "\n".join(placeholder(vision, next(numbers)) if isinstance(p, ImagePart) else p.text for p in parts)

    text = await engine.apply_chat_template([_message(m, inline) for m in messages])
    found = count_placeholders(text, vision)
    if found != images:
        raise InvalidRequestError(
            f"the conversation holds {found} image placeholder(s) ({vision.placeholder}) but {images} image(s) "
            "were sent; place none in the text, the images' parts say where they go",
            param="messages",
        )
    return text


def _message(message: ChatMessage, content: Callable[[Sequence[TextPart | ImagePart]], Any]) -> dict[str, Any]:
    rendered: dict[str, Any] = {"role": message.role}
    rendered["content"] = message.content if isinstance(message.content, str) else content(message.content)
    if message.name is not None:
        rendered["name"] = message.name
    return rendered


def _text_only(parts: Sequence[TextPart | ImagePart]) -> str:
    # Text parts join into one string, as vLLM gives them to templates that take strings.
    return "\n".join(part.text for part in parts if isinstance(part, TextPart))


def _parts(parts: Sequence[TextPart | ImagePart]) -> list[dict[str, str]]:
    return [{"type": "image"} if isinstance(p, ImagePart) else {"type": "text", "text": p.text} for p in parts]
