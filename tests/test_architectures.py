"""Every architecture of the shipped registry, served as its entry says, against transformers.

For each row of ``server/weights/architectures.py`` (one tiny random-weight model per
architecture and structural variant the registry names), the test derives the tiny
model's entry from the shipped entry it stands for (same engine, same prompt format and
image placeholder; float32, a small context and KV cache on this CPU), takes it through
the real ``EnginePool`` and the service's prompt building, and compares with
transformers on the same weights in float32:

- greedy tokens for a few prompts (one longer than every sliding window of the table),
  token for token; the comparison stops before a step whose two likeliest tokens are
  within ``TIE_MARGIN`` of each other, where two correct implementations may differ;
- the prompt's log-probabilities, within ``LOGPROB_TOLERANCE`` (vLLM engines; the
  transformers engine returns none);
- a LoRA adapter for each base whose registered model carries one, against PEFT's merged model;
- an image prompt for each vision architecture, against its transformers processor and model;
- the pool's memory estimate against the resident size of the engine's processes.

Where vLLM computes something else than transformers by design, the reference follows
vLLM and says why (longrope: ``_reference_model``). docs/architectures.md has the table
of what this proves for each architecture.

Each engine starts once and runs all its checks (engine starts dominate the time).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from server.engines.base import SamplingOptions
from server.pool import EnginePool
from server.pool.memory import memory_need
from server.pool.placement import Device
from server.registry import ModelEntry, Registry, load_registry
from server.registry.loader import RegisteredModel
from server.service.prompts import build_prompt
from server.weights.architectures import ARCHITECTURES, ArchitectureSpec
from server.weights.tiny import ensure_builtin, transformers_class
from tests.conftest import TEST_HOME

PROMPTS = (
    "The quick brown fox",
    "def main():\n    return sum(x * x for x in range(10))",
    # About 90 tokens: longer than the sliding windows (32, 48) of the tiny Mistral,
    # Phi-3 and gpt-oss, so the windowed attention is what decides their output.
    " ".join(["Serving large language models on your own GPUs: registries, engines, streaming tokens."] * 6),
)
IMAGE_PROMPT = "What is in this picture?"
MAX_TOKENS = 12
# Tokens a comparison must cover, ties or not: fewer would prove too little.
MIN_COMPARED = 4
# Measured here: vLLM's CPU kernels and transformers agree to about 1e-5 in float32, so
# a margin of 1e-3 between the two likeliest tokens settles the greedy choice.
TIE_MARGIN = 1e-3
LOGPROB_TOLERANCE = 1e-4
CONTEXT = 256
KV_CACHE = "64MiB"

SHIPPED = load_registry()


def tiny_entry(spec: ArchitectureSpec) -> ModelEntry:
    """The shipped entry ``spec`` stands for, pointed at the tiny model: same engine,
    prompt format and image settings; float32 on this CPU, a small context and cache."""
    shipped = [m.entry for m in SHIPPED if m.model_id in spec.registered and m.entry.architecture == spec.architecture]
    keys = shipped[0].model_dump(exclude_unset=True) if shipped else {}
    for fact in ("memory", "parameters_b", "weight_bits", "attention_heads", "tensor_parallel_size", "gated"):
        keys.pop(fact, None)
    keys.update(source=f"builtin:{spec.builtin}", dtype="float32", max_model_len=CONTEXT)
    if keys.get("engine", "vllm") == "vllm":
        keys.update(kv_cache_memory=KV_CACHE, engine_args={"enforce_eager": True})
    return ModelEntry.model_validate(keys)


def tiny_registry(spec: ArchitectureSpec) -> Registry:
    origin = Path(__file__)
    models = {spec.builtin: RegisteredModel(spec.builtin, tiny_entry(spec), origin)}
    if spec.adapter is not None:
        adapter = ModelEntry(base=spec.builtin, adapter=f"builtin:{spec.adapter}")
        models[spec.adapter] = RegisteredModel(spec.adapter, adapter, origin)
    return Registry(models)


def _cases() -> list[Any]:
    # Every architecture runs on vLLM 0.32 on this CPU, so none is marked xfail; a row
    # that cannot be generated without the hub is skipped with the reason.
    return [
        pytest.param(
            spec,
            id=spec.builtin or spec.architecture,
            marks=[pytest.mark.skip(reason=spec.not_generated)] if spec.not_generated else [],
        )
        for spec in ARCHITECTURES
    ]


@dataclass
class Served:
    """What the engine gave for one prompt."""

    prompt_token_ids: list[int]
    token_ids: list[int]  # empty from the transformers engine, which reports text only
    text: str
    prompt_logprobs: list[float | None] | None


@dataclass
class Reference:
    """What transformers gives for the same prompt: greedy tokens, and how many of them
    come before the first near-tie."""

    token_ids: list[int]
    decided: int
    prompt_logprobs: list[float]


def test_every_registered_architecture_has_a_row() -> None:
    """No architecture of the shipped registry goes untested by this module."""
    covered = {spec.architecture for spec in ARCHITECTURES}
    named = {m.entry.architecture for m in SHIPPED if m.entry.architecture is not None}
    assert named <= covered, named - covered
    for spec in ARCHITECTURES:
        for model_id in spec.registered:
            assert SHIPPED.resolve(model_id) is not None, f"{spec.builtin}: {model_id} is not registered"


@pytest.mark.slow
@pytest.mark.parametrize("spec", _cases())
def test_architecture_matches_transformers(spec: ArchitectureSpec) -> None:
    asyncio.run(_check_architecture(spec))


async def _check_architecture(spec: ArchitectureSpec) -> None:
    from transformers import AutoTokenizer

    entry = tiny_entry(spec)
    weights = ensure_builtin(spec.builtin, TEST_HOME)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    pool = EnginePool(tiny_registry(spec), home=TEST_HOME)
    try:
        lease = await pool.lease(spec.builtin)
        try:
            engine = lease.engine
            model = _reference_model(spec, weights)
            tokenizer = AutoTokenizer.from_pretrained(weights)
            for prompt in PROMPTS:
                built = await build_prompt(prompt, entry, engine)
                served = await _serve(engine, built.text, built.add_special_tokens, logprobs=entry.engine == "vllm")
                reference = _reference_text(model, served.prompt_token_ids)
                _compare(spec.builtin, prompt, served, reference, tokenizer)
                if prompt is PROMPTS[-1] and getattr(model.config, "sliding_window", None):
                    _assert_window_matters(model, served.prompt_token_ids, reference)
            if spec.adapter is not None:
                await _check_adapter(spec, entry, engine, weights, tokenizer)
            if spec.vision is not None:
                image = _image()
                built = await build_prompt(IMAGE_PROMPT, entry, engine, images=1)
                served = await _serve(engine, built.text, built.add_special_tokens, images=[image])
                reference = _reference_image(model, weights, built.text, image, served)
                _compare(spec.builtin, "image", served, reference, tokenizer)
            if entry.engine == "vllm":
                _check_memory_estimate(entry, weights, before)
        finally:
            lease.release()
    finally:
        await pool.shutdown()


async def _check_adapter(spec: ArchitectureSpec, entry: ModelEntry, engine: Any, weights: Path, tokenizer: Any) -> None:
    """The base's engine serving the adapter gives PEFT's merged model's tokens, which
    differ from the base's (the adapter's weights are random, not PEFT's no-op start)."""
    assert spec.adapter is not None
    merged = _merged(spec, weights, ensure_builtin(spec.adapter, TEST_HOME))
    changed = False
    for prompt in PROMPTS:
        built = await build_prompt(prompt, entry, engine)
        lora = await _serve(engine, built.text, built.add_special_tokens, adapter=spec.adapter)
        _compare(spec.adapter, prompt, lora, _reference_text(merged, lora.prompt_token_ids), tokenizer)
        base = await _serve(engine, built.text, built.add_special_tokens)
        changed |= base.token_ids != lora.token_ids
    assert changed, f"{spec.adapter} changes no output of its base"


async def _serve(
    engine: Any,
    text: str,
    add_special_tokens: bool,
    *,
    adapter: str | None = None,
    images: Sequence[Any] = (),
    logprobs: bool = True,
) -> Served:
    sampling = SamplingOptions(max_tokens=MAX_TOKENS, temperature=0.0, prompt_logprobs=0 if logprobs else None)
    prepared = await engine.prepare(
        text, sampling, add_special_tokens=add_special_tokens, adapter=adapter, images=images
    )
    tokens: list[int] = []
    text = ""
    prompt_logprobs = None
    async for delta in engine.generate(prepared, f"arch-{os.urandom(4).hex()}", stream=False):
        tokens += delta.token_ids
        text += delta.text
        if delta.prompt_logprobs is not None:
            prompt_logprobs = [p.logprob for p in delta.prompt_logprobs]
    return Served(list(prepared.prompt_token_ids), tokens, text, prompt_logprobs)


def _reference_model(spec: ArchitectureSpec, weights: Path) -> Any:
    import torch
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(weights)
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type") == "longrope" and config.original_max_position_embeddings < CONTEXT:
        # vLLM 0.32 applies longrope's long factors to every sequence once max_model_len
        # exceeds original_max_position_embeddings (so its KV cache stays valid as a
        # sequence grows); transformers switches to them only for a longer sequence. The
        # reference is transformers with the long factors throughout: what vLLM computes.
        rope["short_factor"] = rope["long_factor"]
    return transformers_class(spec.model_class).from_pretrained(weights, config=config, dtype=torch.float32).eval()


def _merged(spec: ArchitectureSpec, weights: Path, adapter: Path) -> Any:
    from peft import PeftModel

    return PeftModel.from_pretrained(_reference_model(spec, weights), adapter).merge_and_unload().eval()


def _reference_text(model: Any, prompt_ids: list[int]) -> Reference:
    import torch

    ids = torch.tensor([prompt_ids])
    return _greedy(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})


def _greedy(model: Any, inputs: dict[str, Any]) -> Reference:
    """transformers' greedy tokens, where the first near-tie falls, and the prompt's
    log-probabilities (each token's given those before it)."""
    import torch

    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=MAX_TOKENS,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
            pad_token_id=3,
        )
        prompt_len = inputs["input_ids"].shape[1]
        if model.config.is_encoder_decoder:
            tokens = out.sequences[0, 1:].tolist()  # after the decoder's start token
            prompt_logprobs: list[float] = []
        else:
            tokens = out.sequences[0, prompt_len:].tolist()
            logits = model(**inputs).logits[0, :-1].float()
            prompt_ids = inputs["input_ids"][0, 1:]
            chosen = torch.log_softmax(logits, dim=-1).gather(1, prompt_ids[:, None])[:, 0]
            prompt_logprobs = chosen.tolist()
    decided = len(tokens)
    for step, scores in enumerate(out.scores):
        top = torch.topk(scores[0].float(), 2).values
        if float(top[0] - top[1]) < TIE_MARGIN:
            decided = step
            break
    return Reference(tokens, decided, prompt_logprobs)


def _compare(name: str, prompt: str, served: Served, reference: Reference, tokenizer: Any) -> None:
    where = f"{name}, prompt {prompt[:30]!r}"
    compared = min(reference.decided, len(reference.token_ids))
    assert compared >= MIN_COMPARED or compared == len(reference.token_ids), (
        f"{where}: only {compared} tokens before a near-tie; choose another prompt"
    )
    if not served.token_ids:
        # The transformers engine reports text: the reference's, decoded as its text is
        # (special tokens left out; a character still incomplete held back).
        def decode(ids: list[int]) -> str:
            return str(tokenizer.decode(ids, skip_special_tokens=True)).rstrip("\ufffd")

        decided = decode(reference.token_ids[:compared])
        assert served.text.startswith(decided), f"{where}: engine {served.text!r} != transformers {decided!r}"
        if compared == len(reference.token_ids):
            assert served.text == decode(reference.token_ids), where
        return
    assert served.token_ids[:compared] == reference.token_ids[:compared], (
        f"{where}: engine {served.token_ids} != transformers {reference.token_ids} (first {compared} compared)"
    )
    if compared == len(reference.token_ids):
        assert served.token_ids == reference.token_ids, where
    if served.prompt_logprobs is not None and reference.prompt_logprobs:
        engine_logprobs = served.prompt_logprobs[1:]  # the first token has none
        assert len(engine_logprobs) == len(reference.prompt_logprobs), where
        worst = max(
            abs(a - b) for a, b in zip(engine_logprobs, reference.prompt_logprobs, strict=True) if a is not None
        )
        assert worst <= LOGPROB_TOLERANCE, f"{where}: prompt log-probabilities differ by {worst:.2e}"


def _assert_window_matters(model: Any, prompt_ids: list[int], reference: Reference) -> None:
    """The long prompt's greedy tokens depend on the sliding window, so matching them
    proves the engine applies it (and where it ends)."""
    window = model.config.sliding_window
    model.config.sliding_window = 1 << 20
    try:
        unwindowed = _reference_text(model, prompt_ids)
    finally:
        model.config.sliding_window = window
    assert unwindowed.token_ids != reference.token_ids, "the sliding window changes nothing for this prompt"


def _image() -> Any:
    """A wide 112x56 picture of noise: LLaVA-NeXT tiles it 1x2, Qwen2-VL gives it 8 tokens."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, size=(56, 112, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _reference_image(model: Any, weights: Path, text: str, image: Any, served: Served) -> Reference:
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(weights)
    inputs = dict(processor(text=[text], images=[image], return_tensors="pt"))
    ids = inputs["input_ids"][0].tolist()
    assert ids == served.prompt_token_ids, f"the engine's image prompt {served.prompt_token_ids} != processor's {ids}"
    return _greedy(model, inputs)


# The pool's estimate against what the engine really holds. The estimate (weights on
# disk + KV cache + ENGINE_OVERHEAD_BYTES) must cover the engine's processes, which is
# what the pool needs of it to never overfill a device, and must not exceed them by more
# than MEMORY_SLACK, which would waste memory. Resident sizes depend on what was loaded,
# not on how fast.
MEMORY_SLACK = 1 << 30


def _check_memory_estimate(entry: ModelEntry, weights: Path, before: set[int]) -> None:
    started = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    resident = sum(_pss(p) for p in started)
    host = Device(None, 1 << 40, 1 << 40)
    estimate = memory_need(entry, str(weights), host)
    print(f"{entry.source}: pool estimate {estimate >> 20} MiB, engine processes {resident >> 20} MiB")
    assert started, "the engine started no processes"
    assert resident <= estimate, f"engine processes hold {resident >> 20} MiB, above the estimate {estimate >> 20} MiB"
    assert estimate - resident <= MEMORY_SLACK, f"estimate {estimate >> 20} MiB, engine {resident >> 20} MiB"


def _pss(process: psutil.Process) -> int:
    """Proportional set size: shared pages count once across the engine's processes."""
    try:
        return int(process.memory_full_info().pss)
    except psutil.NoSuchProcess:
        return 0
