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

# The declared defaults, without the environment: ``Settings`` is their one source.
_DEFAULTS = Settings.model_construct()


@dataclass(frozen=True, slots=True)
class ImagePolicy:
    """The image settings, normalised for the loader; each field's meaning is the
    description of its ``image_*`` setting in ``Settings``."""

    fetch_timeout: float = _DEFAULTS.image_fetch_timeout
    max_bytes: int = _DEFAULTS.image_max_bytes
    max_pixels: int = _DEFAULTS.image_max_pixels
    decoded_pixels: int = _DEFAULTS.image_decoded_pixels
    formats: tuple[str, ...] = tuple(_DEFAULTS.image_formats)
    # Lower-case host names; empty means any host whose addresses are public.
    allowed_domains: frozenset[str] = frozenset(_DEFAULTS.image_allowed_domains)
    allow_private_networks: bool = _DEFAULTS.image_allow_private_networks
    file_root: Path | None = _DEFAULTS.image_file_root

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
