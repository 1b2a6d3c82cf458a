"""Image placeholders: the marks that tell a vision model where each image goes.

vLLM swaps each placeholder in a prompt for one image's feature tokens, in order, and
fails a request whose placeholders and images do not pair up. A caller of the hosted
API writes a prompt and sends images beside it, usually without any placeholder, so
one is added per image; a caller who placed them already keeps that placement, which is
only checked. Models that number their images (Phi-3-vision's ``<|image_1|>``) register
a placeholder with ``{n}``, the image's number from 1.
"""

from __future__ import annotations

import re

from server.errors import InvalidRequestError
from server.registry import VisionSettings

NUMBER = "{n}"


def placeholder(vision: VisionSettings, number: int) -> str:
    """The placeholder of image ``number`` (from 1)."""
    return vision.placeholder.replace(NUMBER, str(number))


def count_placeholders(text: str, vision: VisionSettings) -> int:
    pattern = r"\d+".join(re.escape(part) for part in vision.placeholder.split(NUMBER))
    return len(re.findall(pattern, text))


def with_placeholders(prompt: str, vision: VisionSettings, images: int) -> str:
    """``prompt`` holding exactly one placeholder per image.

    Without placeholders, they go before the prompt, one a line, where the model cards
    of LLaVA, Phi-3-vision and Qwen2-VL put them.
    """
    found = count_placeholders(prompt, vision)
    if found == 0:
        return "".join(f"{placeholder(vision, n)}\n" for n in range(1, images + 1)) + prompt
    if found != images:
        raise InvalidRequestError(
            f"the prompt holds {found} image placeholder(s) ({vision.placeholder}) but {images} "
            "image(s) were sent; place one per image, or none to have them put before the prompt",
            param="prompt",
        )
    return prompt
