"""What an engine must know about a LoRA adapter before it starts.

vLLM sizes its LoRA buffers at start-up for the largest rank it will be asked to load,
so the rank of every adapter on a base model is read before the base's engine starts.
"""

from __future__ import annotations

import json
from pathlib import Path


def lora_rank(adapter: str) -> int:
    """The rank ``r`` in the ``adapter_config.json`` of the directory ``resolve_source``
    made present (a hub adapter is downloaded before its base's engine starts)."""
    config = Path(adapter) / "adapter_config.json"
    try:
        return int(json.loads(config.read_text(encoding="utf-8"))["r"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{config}: not a readable LoRA adapter config ({exc})") from exc
