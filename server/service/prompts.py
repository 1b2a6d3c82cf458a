"""Turning the contract's ``prompt`` into the text the engine tokenizes.

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

from dataclasses import dataclass

from server.errors import InvalidRequestError
from server.pool import Engine
from server.registry import ModelEntry, VisionSettings
from server.service.placeholders import count_placeholders, with_placeholders


@dataclass(frozen=True, slots=True)
class BuiltPrompt:
    text: str
    add_special_tokens: bool


def build_prompt(prompt: str, entry: ModelEntry, engine: Engine, *, images: int = 0) -> BuiltPrompt:
    """``images``: how many images go with the prompt (the service sends them only to
    vision entries). Without images a vision model's prompt is left as written."""
    vision = entry.vision if images else None
    if entry.prompt_format == "chat":
        return BuiltPrompt(text=_chat(prompt, vision, images, engine), add_special_tokens=False)
    text = prompt if vision is None else with_placeholders(prompt, vision, images)
    return BuiltPrompt(text=text, add_special_tokens=True)


def _chat(prompt: str, vision: VisionSettings | None, images: int, engine: Engine) -> str:
    if vision is None:
        return engine.apply_chat_template([{"role": "user", "content": prompt}])
    if not count_placeholders(prompt, vision):
        parts = [{"type": "image"}] * images + [{"type": "text", "text": prompt}]
        try:
            text = engine.apply_chat_template([{"role": "user", "content": parts}])
        except InvalidRequestError:
            text = None
        if text is not None and count_placeholders(text, vision) == images:
            return text
    content = with_placeholders(prompt, vision, images)
    return engine.apply_chat_template([{"role": "user", "content": content}])
