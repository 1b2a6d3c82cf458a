"""Bytes -> an RGB Pillow image, refusing what could hurt the decoder or the server.

Only the operator's formats are even tried (``Image.open(formats=...)``), which keeps
untrusted bytes away from Pillow's rarer parsers. ``Image.open`` reads only the header,
so the pixel count is checked before a single pixel is decoded: a 20 KiB PNG can declare
10 000 x 10 000 pixels and would take 300 MB once loaded (a decompression bomb).
"""

from __future__ import annotations

import io

from PIL import Image

from server.errors import InvalidRequestError, PayloadTooLargeError
from server.service.images.policy import ImagePolicy


def decode_image(data: bytes, policy: ImagePolicy, *, param: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data), formats=policy.formats) as image:
            width, height = image.size
            if width * height > policy.max_pixels:
                raise PayloadTooLargeError(
                    f"{param} is {width}x{height} pixels, over this server's limit of {policy.max_pixels} pixels",
                    param=param,
                )
            # convert() loads the pixels; a truncated file fails here, not later in the engine.
            return image.convert("RGB")
    except Image.UnidentifiedImageError as exc:
        raise InvalidRequestError(f"{param} is not a {_names(policy.formats)} image", param=param) from exc
    except Image.DecompressionBombError as exc:
        # Pillow's own ceiling, reached only when max_pixels is set above it.
        raise PayloadTooLargeError(f"{param} has too many pixels to decode ({exc})", param=param) from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidRequestError(f"{param} is a broken or truncated image ({exc})", param=param) from exc


def _names(formats: tuple[str, ...]) -> str:
    return formats[0] if len(formats) == 1 else f"{', '.join(formats[:-1])} or {formats[-1]}"
