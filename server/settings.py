"""The one settings object: everything about this server that is not a model.

Read from ``V4SERVE_*`` environment variables, with command-line flags laid over them by
``v4serve serve``. Models live in the registry, never here.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import ByteSize, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

LOOPBACK = "127.0.0.1"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="V4SERVE_", extra="forbid")

    host: str | None = Field(
        default=None,
        description="Address to bind; unset means loopback when no API keys are set, else 0.0.0.0.",
    )
    port: int = Field(default=8000, ge=0, le=65535)
    registry_files: list[Path] = Field(default_factory=list)
    preload: list[str] = Field(default_factory=list)
    api_keys: str = Field(default="", description="Comma-separated 'key' or 'key:account' items.")
    api_keys_file: Path | None = None
    home: Path = Field(
        default=Path("~/.cache/v4serve").expanduser(),
        description="Where builtin models are generated.",
    )
    load_timeout: float = Field(default=900.0, gt=0, description="Seconds a request waits for a model to load.")
    memory_budget: ByteSize | None = Field(
        default=None,
        description="Memory engines may use on each device (GPU memory, or RAM without GPUs); "
        "default 90% of each device.",
    )
    keep_alive: float | None = Field(
        default=None, gt=0, description="Seconds an unused model stays loaded; unset: until memory is needed."
    )
    sleep_mode: bool = Field(
        default=False,
        description="On GPUs, put idle models to sleep (weights to host memory) instead of unloading them.",
    )
    shutdown_timeout: float = Field(
        default=30.0, ge=0, description="Seconds running requests get to finish after SIGTERM."
    )
    max_body_bytes: int = Field(default=32 << 20, gt=0)
    # Images for vision models (server.service.images): deny by default, see ImagePolicy.
    image_fetch_timeout: float = Field(default=10.0, gt=0, description="Seconds to fetch all of one request's images.")
    image_max_bytes: int = Field(default=20 << 20, gt=0)
    image_max_pixels: int = Field(
        default=40_000_000, gt=0, description="Width x height, checked before any pixel is decoded."
    )
    image_decoded_pixels: int = Field(
        default=400_000_000,
        gt=0,
        description="Decoded image pixels (3 bytes each in RGB) all requests may hold at once; past it, 429. "
        "The default holds two requests of four images at the largest image_max_pixels, about 1.2 GB of RGB.",
    )
    image_formats: list[str] = Field(default_factory=lambda: ["PNG", "JPEG", "GIF", "WEBP", "BMP"])
    image_allowed_domains: list[str] = Field(
        default_factory=list, description="Hosts image URLs may name; empty means any public host."
    )
    image_allow_private_networks: bool = Field(
        default=False, description="Also fetch from loopback, private and link-local hosts (trusted networks)."
    )
    image_file_root: Path | None = Field(
        default=None, description="The one folder file:// image URLs may read; unset refuses file://."
    )
    log_level: str = "info"
