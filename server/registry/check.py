"""Whether every entry of a merged registry can be served, decided without the weights.

Loading a registry already validates each file against the schema and refuses an ID or
alias defined twice, or a LoRA entry without a vLLM base. What loading cannot know is
what the installed engines run: an architecture vLLM dropped, or a tensor-parallel size
that does not divide the attention heads. Those would otherwise surface one model at a
time, minutes into a load on a GPU machine; ``v4serve check`` finds them all at once.

The facts come from the entry's own keys (``architecture``, ``attention_heads``), or,
for an operator's local checkpoint that does not state them, from its ``config.json``.
An entry's ``memory`` is also held against what its weights alone take, from
``parameters_b`` and ``weight_bits`` (or ``dtype``): the engine pool places and evicts
models by that figure, so one too small would overfill a GPU.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ByteSize

from server.registry.engine_kinds import architecture_refusal
from server.registry.loader import RegisteredModel, Registry
from server.weights import local_dir


@dataclass(frozen=True)
class Problem:
    origin: Path
    model_id: str
    key: str
    message: str
    warning: bool = False

    def __str__(self) -> str:
        severity = "warning: " if self.warning else ""
        return f"{self.origin}: {severity}model '{self.model_id}': key '{self.key}': {self.message}"


def check_registry(registry: Registry) -> list[Problem]:
    """Every problem of every entry; warnings are things check could not decide, or figures
    that look wrong but only the operator can correct."""
    problems: list[Problem] = []
    for registered in registry:
        problems += check_entry(registered)
    return problems


def check_entry(registered: RegisteredModel) -> list[Problem]:
    """The problems of one entry, as ``check_registry`` finds them (the admin API checks
    an entry it is given this way)."""
    # An adapter runs on its base's engine; loading has checked that base already.
    return [] if registered.entry.is_adapter else _check_model(registered)


def _check_model(registered: RegisteredModel) -> list[Problem]:
    entry = registered.entry

    def problem(key: str, message: str, *, warning: bool = False) -> Problem:
        return Problem(registered.origin, registered.model_id, key, message, warning)

    config = _local_config(entry.source or "")
    if isinstance(config, str):
        return [problem("source", config)]
    architecture = entry.architecture or _first(config.get("architectures"))
    heads = entry.attention_heads or config.get("num_attention_heads") or config.get("n_head")
    problems = []
    if architecture is None:
        problems.append(
            problem(
                "architecture",
                "not set, and the source is no local checkpoint whose config.json says it; "
                "set it so check can tell whether the engine runs the model",
                warning=True,
            )
        )
    else:
        refusal = _engine_refusal(entry.engine, architecture)
        if refusal:
            problems.append(problem("architecture", refusal))
    tp = entry.tensor_parallel_size
    if isinstance(heads, int) and heads % tp:
        fitting = [n for n in range(1, 9) if heads % n == 0]
        problems.append(
            problem(
                "tensor_parallel_size",
                f"{tp} does not divide the model's {heads} attention heads "
                f"(sizes up to 8 that do: {', '.join(map(str, fitting))})",
            )
        )
    weights = entry.weight_bytes()
    if weights is not None and entry.memory is not None and entry.memory < weights:
        problems.append(
            problem(
                "memory",
                f"{entry.memory.human_readable()} is less than the {ByteSize(weights).human_readable()} that "
                f"{entry.parameters_b:g}B parameters take at {entry.parameter_bits:g} bits each, before any KV cache; raise "
                "it, or set weight_bits for a quantized checkpoint",
                warning=True,
            )
        )
    return problems


def _engine_refusal(engine: str, architecture: str) -> str | None:
    """Why ``engine`` cannot run ``architecture``, or None when it can."""
    import transformers

    in_transformers = hasattr(transformers, architecture)
    if engine == "transformers":
        if in_transformers:
            return architecture_refusal(architecture)
        return f"transformers {transformers.__version__} has no model class '{architecture}'"
    if architecture in _vllm_architectures():
        return None
    import vllm

    served = in_transformers and architecture_refusal(architecture) is None
    hint = "; the transformers engine serves it: set engine: transformers" if served else ""
    return f"vLLM {vllm.__version__} does not run '{architecture}'{hint}"


@functools.cache
def _vllm_architectures() -> frozenset[str]:
    # Imported only when asked: vLLM takes seconds to import.
    from vllm.model_executor.models import ModelRegistry

    return frozenset(ModelRegistry.get_supported_archs())


def _local_config(source: str) -> dict[str, Any] | str:
    """A local checkpoint's config.json; {} for other sources; a string says why it is unreadable."""
    directory = local_dir(source)
    if directory is None or not directory.is_dir():
        return {}
    path = directory / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        return f"{path} is not a readable config.json ({exc})"
    return config if isinstance(config, dict) else f"{path} does not hold a JSON object"


def _first(values: Any) -> str | None:
    return values[0] if isinstance(values, list) and values and isinstance(values[0], str) else None
