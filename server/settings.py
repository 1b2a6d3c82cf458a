"""The one settings object: everything about this server that is not a model.

Read from ``V4SERVE_*`` environment variables, with command-line flags laid over them by
``v4serve serve``. Models live in the registry, never here.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
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
    max_body_bytes: int = Field(default=32 << 20, gt=0)
    log_level: str = "info"
