"""The OpenAI parameters on the transformers engine (tiny MPT, in this process).

Token-ID prompts, seeds and logit bias are served as on vLLM; log-probabilities are not
computed there, and a request for them is refused with a 400 that names the engine that
computes them. Through the service too, so a ``/v1`` request to such a model gets it.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from server.engines.base import SamplingOptions
from server.engines.transformers_engine import TransformersEngine
from server.errors import InvalidRequestError
from server.pool import EnginePool
from server.registry import ModelEntry, RegisteredModel, Registry
from server.service import CompletionService, GenerationRequest, ImagePolicy, SamplingRequest, TokenPrompt
from server.weights.tiny import TOKENIZER_VOCAB_SIZE, ensure_builtin
from tests.conftest import TEST_HOME

pytestmark = pytest.mark.slow

MODEL = "tiny-mpt"
ENTRY = ModelEntry(source=f"builtin:{MODEL}", engine="transformers", dtype="float32", max_model_len=512)


@pytest.fixture(scope="module")
async def engine() -> AsyncIterator[TransformersEngine]:
    started = await TransformersEngine.start(MODEL, ENTRY, str(ensure_builtin(MODEL, TEST_HOME)))
    yield started
    await started.shutdown()


async def tokens_of(engine: TransformersEngine, prompt: str | list[int], sampling: SamplingOptions) -> str:
    prepared = await engine.prepare(prompt, sampling)
    return "".join([delta.text async for delta in engine.generate(prepared, uuid.uuid4().hex)])


async def test_token_id_prompts_answer_as_their_text(engine: TransformersEngine) -> None:
    greedy = SamplingOptions(max_tokens=8, temperature=0)
    prepared = await engine.prepare("Hello there", greedy)
    assert list(prepared.prompt_token_ids) == prepared.engine_input
    by_ids = await tokens_of(engine, list(prepared.prompt_token_ids), greedy)
    assert by_ids == await tokens_of(engine, "Hello there", greedy)
    with pytest.raises(InvalidRequestError, match="outside the vocabulary") as outside:
        await engine.prepare([1, TOKENIZER_VOCAB_SIZE + 10**6], greedy)
    assert outside.value.param == "prompt"


async def test_a_seed_repeats_a_sample_whatever_the_batch(engine: TransformersEngine) -> None:
    seeded = SamplingOptions(max_tokens=12, temperature=1.0, seed=99)
    first = await tokens_of(engine, "Hello", seeded)
    assert await tokens_of(engine, "Hello", seeded) == first
    # Decoded together with other requests, the seeded one still draws the same tokens.
    others = SamplingOptions(max_tokens=12, temperature=1.0)
    together = await asyncio.gather(
        tokens_of(engine, "Hello", seeded), tokens_of(engine, "Other", others), tokens_of(engine, "More", others)
    )
    assert together[0] == first
    different = {
        await tokens_of(engine, "Hello", SamplingOptions(max_tokens=12, temperature=1.0, seed=s)) for s in range(4)
    }
    assert len(different) > 1


async def test_logit_bias_steers_the_choice(engine: TransformersEngine) -> None:
    favoured = 7  # an ordinary token of the tiny tokenizer
    unbiased = await tokens_of(engine, "Hello", SamplingOptions(max_tokens=5, temperature=0))
    biased = await tokens_of(
        engine, "Hello", SamplingOptions(max_tokens=5, temperature=0, logit_bias=((favoured, 100.0),))
    )
    assert biased == await engine.decode([favoured] * 5) != unbiased
    with pytest.raises(InvalidRequestError) as outside:
        await engine.prepare("Hello", SamplingOptions(max_tokens=1, temperature=0, logit_bias=((10**9, 1.0),)))
    assert outside.value.param == "logit_bias"


@pytest.mark.parametrize("options", [{"logprobs": 0}, {"prompt_logprobs": 2}])
async def test_logprobs_are_refused_naming_the_engine_that_computes_them(
    engine: TransformersEngine, options: dict
) -> None:
    with pytest.raises(InvalidRequestError) as refused:
        await engine.prepare("Hello", SamplingOptions(max_tokens=1, temperature=0, **options))
    assert refused.value.status_code == 400
    assert refused.value.param == "logprobs"
    assert "transformers engine" in refused.value.message and "engine: vllm" in refused.value.message


async def test_the_service_refuses_logprobs_for_its_models_but_echoes_without(tmp_path: Path) -> None:
    registry = Registry({MODEL: RegisteredModel(MODEL, ENTRY, tmp_path / "ops.yaml")})
    ensure_builtin(MODEL, TEST_HOME)
    pool = EnginePool(registry, home=TEST_HOME)
    service = CompletionService(pool, ImagePolicy())
    try:
        asking = GenerationRequest(
            model=MODEL,
            prompts=(TokenPrompt((5, 6, 7)),),
            sampling=SamplingRequest(temperature=0, max_tokens=0, logprobs=1),
            echo=True,
        )
        with pytest.raises(InvalidRequestError, match="does not compute log-probabilities"):
            await service.prepare_generation(asking)
        # Echo without logprobs needs no engine computation at all.
        plain = GenerationRequest(
            model=MODEL,
            prompts=(TokenPrompt((5, 6, 7)),),
            sampling=SamplingRequest(temperature=0, max_tokens=0),
            echo=True,
        )
        pending = await service.prepare_generation(plain)
        try:
            result = await pending.result()
        finally:
            pending.close()
        (choice,) = result.choices
        assert (choice.finish_reason, choice.completion_tokens, result.prompt_tokens) == ("length", 0, 3)
        assert choice.text
    finally:
        await pool.shutdown()
