"""Bytes -> an RGB Pillow image, refusing what could hurt the decoder or the server.

Checking and decoding are two steps, because they happen at different times: a request's
images are checked (``inspect_image``) as soon as they are read, and decoded
(``decode_image``) only once the request holds its place in the engine. Only the
operator's formats are even tried (``Image.open(formats=...)``), which keeps untrusted
bytes away from Pillow's rarer parsers. ``Image.open`` reads only the header, so the
pixel count is known and checked before a single pixel is decoded: a 5 KB PNG can
declare 6300 x 6300 pixels, 119 MB once decoded (a decompression bomb).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from PIL import Image

from server.errors import InvalidRequestError, PayloadTooLargeError
from server.service.images.policy import ImagePolicy


@dataclass(frozen=True, slots=True)
class EncodedImage:
    """An image as sent, its header checked: what a request holds while it waits."""

    data: bytes
    width: int
    height: int
    param: str

    @property
    def pixels(self) -> int:
        return self.width * self.height


def inspect_image(data: bytes, policy: ImagePolicy, *, param: str) -> EncodedImage:
    """Refuse an unknown format or too many pixels from the header alone."""
    with _pillow_errors(policy, param), Image.open(io.BytesIO(data), formats=policy.formats) as image:
        width, height = image.size
    if width * height > policy.max_pixels:
        raise PayloadTooLargeError(
            f"{param} is {width}x{height} pixels, over this server's limit of {policy.max_pixels} pixels",
            param=param,
        )
    return EncodedImage(data, width, height, param)


def decode_image(image: EncodedImage, policy: ImagePolicy) -> Image.Image:
    with _pillow_errors(policy, image.param), Image.open(io.BytesIO(image.data), formats=policy.formats) as opened:
        # convert() loads the pixels; a truncated file fails here, not later in the engine.
        return opened.convert("RGB")


@contextmanager
def _pillow_errors(policy: ImagePolicy, param: str) -> Iterator[None]:
    """Pillow's ways of refusing bytes, as the caller's error naming the image."""
    try:
        yield
    except Image.UnidentifiedImageError as exc:
        raise InvalidRequestError(f"{param} is not a {_names(policy.formats)} image", param=param) from exc
    except Image.DecompressionBombError as exc:
        # Pillow's own ceiling, reached only when max_pixels is set above it.
        raise PayloadTooLargeError(f"{param} has too many pixels to decode ({exc})", param=param) from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidRequestError(f"{param} is a broken or truncated image ({exc})", param=param) from exc


def _names(formats: tuple[str, ...]) -> str:
    return formats[0] if len(formats) == 1 else f"{', '.join(formats[:-1])} or {formats[-1]}"
