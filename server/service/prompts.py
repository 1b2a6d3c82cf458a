"""Turning the contract's ``prompt`` into the text the engine tokenizes.

The hosted API sends open models the prompt as written (``raw``). An entry registered
with ``prompt_format: chat`` has the prompt wrapped as one user message and rendered
with the model's own chat template, which already carries the BOS token, so the
tokenizer must not add another.
"""

from __future__ import annotations

from dataclasses import dataclass

from server.engines import Engine
from server.registry import ModelEntry


@dataclass(frozen=True, slots=True)
class BuiltPrompt:
    text: str
    add_special_tokens: bool


def build_prompt(prompt: str, entry: ModelEntry, engine: Engine) -> BuiltPrompt:
    if entry.prompt_format == "chat":
        text = engine.apply_chat_template([{"role": "user", "content": prompt}])
        return BuiltPrompt(text=text, add_special_tokens=False)
    return BuiltPrompt(text=prompt, add_special_tokens=True)
