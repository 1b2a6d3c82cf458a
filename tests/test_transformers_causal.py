"""The transformers engine's decoder-only path: batching that changes no row's output.

The contract over HTTP is tested on the tiny MPT beside the tiny T5 in
test_transformers_engine.py. Here: the decoder-only batch itself, with rows of
different lengths joining and leaving between steps, compared token for token with
``generate`` run on each request alone, for the tiny MPT checkpoint and for every model
type the engine accepts; and the models and architectures the engine refuses, at load
and in ``v4serve check``.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from server.engines._causal_batch import CausalBatch
from server.registry import ModelEntry, load_registry
from server.registry.check import check_registry
from server.registry.engine_kinds import DECODER_ONLY_MODELS
from server.weights.tiny import ensure_builtin
from tests.conftest import TEST_HOME

PAD = 3


@dataclass
class Request:
    prompt: list[int]
    tokens_wanted: int
    joins_at: int  # the step before which it is prefilled
    tokens: list[int] = field(default_factory=list)


# Rows of different lengths: two start together, two join later (one longer than every
# row then in the batch, one shorter), and each leaves after its own number of tokens.
def schedule() -> list[Request]:
    return [
        Request([0, 52, 88, 296, 224, 28, 29], tokens_wanted=12, joins_at=0),
        Request([0, 7], tokens_wanted=4, joins_at=0),
        Request([0, *range(100, 130)], tokens_wanted=9, joins_at=3),
        Request([0, 300, 301], tokens_wanted=14, joins_at=3),
        Request([0, 500], tokens_wanted=1, joins_at=5),
    ]


def decode_continuously(model: Any, requests: list[Request]) -> None:
    """Greedy decoding as the engine's worker runs it: before each step the requests due
    are prefilled together and join the batch; a finished row leaves at once."""
    batch: CausalBatch | None = None
    rows: list[Request] = []
    step = 0
    with torch.inference_mode():
        while rows or any(r.joins_at >= step for r in requests):
            arrivals = [r for r in requests if r.joins_at == step]
            if arrivals:
                joined, logits = CausalBatch.prefill(model, [r.prompt for r in arrivals], PAD)
                if batch is None:
                    batch = joined
                else:
                    batch.extend(joined)
                rows += arrivals
                _take(batch, rows, logits, first=len(rows) - len(arrivals))
            if rows:
                _take(batch, rows, batch.step([r.tokens[-1] for r in rows]))
            if not rows:
                batch = None
            step += 1


def _take(batch: CausalBatch, rows: list[Request], logits: torch.Tensor, first: int = 0) -> None:
    """Append each row's greedy token (rows from ``first`` on); finished rows leave."""
    for request, token in zip(rows[first:], logits.argmax(dim=-1).tolist(), strict=True):
        request.tokens.append(token)
    staying = [row for row, request in enumerate(rows) if len(request.tokens) < request.tokens_wanted]
    if len(staying) < len(rows):
        if staying:
            batch.keep(staying)
        rows[:] = [rows[row] for row in staying]


def alone(model: Any, request: Request) -> list[int]:
    prompt = torch.tensor([request.prompt])
    output = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=request.tokens_wanted,
        min_new_tokens=request.tokens_wanted,
        do_sample=False,
        pad_token_id=PAD,
    )
    return output[0, prompt.shape[1] :].tolist()


def assert_batched_equals_alone(model: Any) -> None:
    requests = schedule()
    decode_continuously(model, requests)
    for request in requests:
        assert request.tokens == alone(model, request), request.prompt


@pytest.mark.slow
def test_tiny_mpt_decodes_batched_as_alone() -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ensure_builtin("tiny-mpt", TEST_HOME)).eval()
    assert model.config.model_type == "mpt" and model.config.attn_config.alibi
    assert_batched_equals_alone(model)


# A tiny random configuration of each accepted model type, with each way of giving
# positions: ALiBi (mpt, bloom, falcon with alibi), rotary (llama, gpt_neox, falcon)
# and learned absolute positions (gpt2).
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "mpt": {"d_model": 64, "n_heads": 2, "n_layers": 2, "max_seq_len": 256},
    "llama": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
    },
    "gpt2": {"n_embd": 64, "n_layer": 2, "n_head": 2, "n_positions": 256},
    "gpt_neox": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2},
    "bloom": {"hidden_size": 64, "n_layer": 2, "n_head": 2},
    "falcon": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "alibi": False},
    "falcon-alibi": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "alibi": True},
}


@pytest.mark.slow
@pytest.mark.parametrize("variant", sorted(TINY_CONFIGS))
def test_every_accepted_model_type_decodes_batched_as_alone(variant: str) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type = variant.split("-")[0]
    config = AutoConfig.for_model(
        model_type,
        vocab_size=1024,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=PAD,
        initializer_range=0.2,  # varied greedy output
        **TINY_CONFIGS[variant],
    )
    torch.manual_seed(0)
    assert_batched_equals_alone(AutoModelForCausalLM.from_config(config).eval())


def test_every_accepted_model_type_is_tested() -> None:
    assert {variant.split("-")[0] for variant in TINY_CONFIGS} == DECODER_ONLY_MODELS


# What the engine refuses ----------------------------------------------------------


def start_engine(weights: Path, **entry: Any) -> None:
    from server.engines.transformers_engine import TransformersEngine

    model_entry = ModelEntry(source=str(weights), engine="transformers", **entry)

    async def scenario() -> None:
        engine = await TransformersEngine.start("under-test", model_entry, str(weights))
        await engine.shutdown()

    asyncio.run(scenario())


def test_a_model_type_the_engine_cannot_batch_is_refused_at_load(tmp_path: Path) -> None:
    # RWKV is recurrent: its state is no KV cache that rows could be padded in.
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "rwkv", "architectures": ["RwkvForCausalLM"]}))
    with pytest.raises(ValueError, match=r"decoder-only model type 'rwkv'.*mpt.*engine: vllm"):
        start_engine(tmp_path)


def test_a_context_longer_than_the_positions_is_refused_at_load() -> None:
    with pytest.raises(ValueError, match=r"max_model_len 4096 .* 2048 positions"):
        start_engine(ensure_builtin("tiny-mpt", TEST_HOME), max_model_len=4096)


def test_check_reports_an_architecture_the_engine_cannot_serve(tmp_path: Path) -> None:
    overlay = tmp_path / "operator.yaml"
    overlay.write_text(
        """
models:
  mpt-here:
    source: example-org/mpt
    engine: transformers
    architecture: MptForCausalLM
  rwkv-here:
    source: example-org/rwkv
    engine: transformers
    architecture: RwkvForCausalLM
  rwkv-on-vllm:
    source: example-org/rwkv
    architecture: RwkvForCausalLM
""",
        encoding="utf-8",
    )
    problems = {p.model_id: p for p in check_registry(load_registry([overlay]))}
    assert "mpt-here" not in problems
    assert problems["rwkv-here"].key == "architecture"
    assert "transformers engine does not serve 'RwkvForCausalLM'" in problems["rwkv-here"].message
    # vLLM does not run RWKV either, but no engine change would help.
    assert "does not run 'RwkvForCausalLM'" in problems["rwkv-on-vllm"].message
    assert "engine: transformers" not in problems["rwkv-on-vllm"].message
