"""What an operator lets a request's images be: where they may come from and how big.

Every limit is on by default, because each image URL makes this server a client of a
host the caller chose (complaint 6 of the serving anchors: vLLM fetched internal and
cloud-metadata addresses until CVE-2025-6242). Loosening is the operator's call, made
once in ``Settings``, never a request's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from server.errors import PayloadTooLargeError
from server.settings import Settings


@dataclass(frozen=True, slots=True)
class ImagePolicy:
    fetch_timeout: float = 10.0
    max_bytes: int = 20 << 20
    # Decompression-bomb guard: a tiny PNG can declare 10 000 x 10 000 pixels.
    max_pixels: int = 40_000_000
    # Pixels all requests may hold decoded at once (PixelBudget): bytes are cheap to queue,
    # pixels are not (a 5 KB PNG can decode to 119 MB).
    decoded_pixels: int = 400_000_000
    formats: tuple[str, ...] = ("PNG", "JPEG", "GIF", "WEBP", "BMP")
    # Lower-case host names; empty means any host whose addresses are public.
    allowed_domains: frozenset[str] = frozenset()
    # True turns the address guard off, for servers that only face trusted networks.
    allow_private_networks: bool = False
    # None refuses file:// URLs; otherwise only files inside this folder are read.
    file_root: Path | None = None

    def __post_init__(self) -> None:
        # Pillow only learns an unknown format name when an image arrives; fail at start-up.
        Image.init()
        unknown = sorted(set(self.formats) - set(Image.OPEN))
        if unknown:
            raise ValueError(f"unknown image formats {unknown}; Pillow reads {sorted(Image.OPEN)}")

    def oversize(self, *, param: str) -> PayloadTooLargeError:
        """413, like an oversized request body: the caller must send a smaller image."""
        message = f"image is larger than this server's limit of {self.max_bytes} bytes"
        return PayloadTooLargeError(message, param=param)

    @classmethod
    def from_settings(cls, settings: Settings) -> ImagePolicy:
        return cls(
            fetch_timeout=settings.image_fetch_timeout,
            max_bytes=settings.image_max_bytes,
            max_pixels=settings.image_max_pixels,
            decoded_pixels=settings.image_decoded_pixels,
            formats=tuple(name.upper() for name in settings.image_formats),
            allowed_domains=frozenset(domain.lower().rstrip(".") for domain in settings.image_allowed_domains),
            allow_private_networks=settings.image_allow_private_networks,
            file_root=settings.image_file_root,
        )
