"""LoRA fine-tunes: adapter entries served by their base model's engine.

The reference is PEFT applying the same adapter to the same weights in this process, so
the test shows that vLLM applied the adapter (not merely that output changed). The tiny
models have random weights, so two logits can be nearly tied; a step that close could
go either way between two correct float32 implementations, and the comparison stops
before it, but never before ``MIN_COMPARED`` tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from scale_gp import SGPClient

from server.engines import AdapterRef
from server.registry import ModelEntry, RegistryError, load_registry
from tests.conftest import API_KEY, FIXTURES, TEST_HOME, RunningServer, start_server

PROMPT = "The quick brown fox"
GREEDY = {"temperature": 0}
BASE_DIR = TEST_HOME / "builtin" / "tiny-llama"
ADAPTER_DIR = TEST_HOME / "builtin" / "tiny-llama-lora"
MAX_TOKENS = 16
MIN_COMPARED = 8
# Measured: log-probabilities of vLLM's CPU kernels (LoRA included) and of transformers
# agree to 1e-5, so a margin of 1e-3 between the top two logits settles greedy choice.
TIE_MARGIN = 1e-3


@pytest.fixture(scope="module")
def lora_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    running = start_server(
        tmp_path_factory.mktemp("lora"),
        registry_files=[FIXTURES / "lora_overlay.yaml"],
        preload=["tiny-llama"],
    )
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(lora_server: RunningServer) -> SGPClient:
    return SGPClient(api_key=API_KEY, base_url=lora_server.base_url, max_retries=0, timeout=600)


@pytest.fixture(scope="module")
def tokenizer(lora_server: RunningServer):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(BASE_DIR)


def complete(client: SGPClient, model: str, **params) -> tuple[str, dict]:
    """Greedy completion of ``PROMPT``: its text and token usage."""
    response = client.completions.create(model=model, prompt=PROMPT, model_parameters={**GREEDY, **params}).model_dump()
    return response["completion"]["text"], response["token_usage"]


def decode(tokenizer, tokens: list[int]) -> str:
    """The text a completion of ``tokens`` shows: a streaming detokenizer holds back the
    bytes of a character not yet complete, so a completion ending inside one omits them."""
    return tokenizer.decode(tokens, skip_special_tokens=True).rstrip("\ufffd")


def reference_greedy(prompt_ids: list[int], adapter: Path | None) -> list[int]:
    """Greedy tokens from transformers in float32 (with PEFT applying ``adapter``), cut
    before the first step whose top two logits are within ``TIE_MARGIN``."""
    import torch
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(BASE_DIR, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]),
            max_new_tokens=MAX_TOKENS,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
        )
    tokens = out.sequences[0, len(prompt_ids) :].tolist()
    for step, scores in enumerate(out.scores):
        top2 = scores[0].topk(2).values
        if top2[0] - top2[1] < TIE_MARGIN:
            tokens = tokens[:step]
            break
    assert len(tokens) >= MIN_COMPARED, f"only {len(tokens)} greedy steps are clear of ties"
    return tokens


@pytest.mark.slow
@pytest.mark.parametrize(("model", "adapter"), [("tiny-llama", None), ("tiny-lora", ADAPTER_DIR)])
def test_output_matches_transformers_and_peft(client: SGPClient, tokenizer, model, adapter) -> None:
    prompt_ids = tokenizer(PROMPT).input_ids
    expected = reference_greedy(prompt_ids, adapter)
    text, usage = complete(client, model, max_tokens=len(expected))
    assert text == decode(tokenizer, expected)
    assert usage["prompt"] == len(prompt_ids)
    assert usage["completion"] == len(expected)
    assert usage["total"] == usage["prompt"] + usage["completion"]


@pytest.mark.slow
def test_adapter_changes_the_output(client: SGPClient) -> None:
    base, _ = complete(client, "tiny-llama", max_tokens=MAX_TOKENS)
    adapted, _ = complete(client, "tiny-lora", max_tokens=MAX_TOKENS)
    assert adapted != base


@pytest.mark.slow
def test_adapter_entry_keeps_its_own_prompt_format_and_default_max_tokens(client: SGPClient, tokenizer) -> None:
    # tiny-lora-chat: prompt_format chat and default_max_tokens 12, with the base's tokenizer.
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True
    )
    prompt_ids = tokenizer(rendered, add_special_tokens=False).input_ids
    expected = reference_greedy(prompt_ids, ADAPTER_DIR)[:12]
    text, usage = complete(client, "tiny-lora-chat")
    assert text == decode(tokenizer, expected)
    assert usage["prompt"] == len(prompt_ids)
    assert usage["completion"] == 12


@pytest.mark.slow
def test_streaming_matches_non_streaming(client: SGPClient) -> None:
    whole, usage = complete(client, "tiny-lora", max_tokens=MAX_TOKENS)
    stream = client.completions.create(
        model="tiny-lora", prompt=PROMPT, model_parameters={**GREEDY, "max_tokens": MAX_TOKENS}, stream=True
    )
    chunks = [c.model_dump() for c in stream]
    assert "".join(c["completion"]["text"] for c in chunks) == whole
    assert len(chunks) > 1
    assert chunks[-1]["token_usage"] == usage


@pytest.mark.slow
def test_one_engine_serves_the_base_and_its_adapters(client: SGPClient, lora_server: RunningServer) -> None:
    for model in ("tiny-llama", "tiny-lora", "tiny-lora-chat"):
        complete(client, model, max_tokens=4)
    with lora_server.client() as http:
        models = {m["id"]: m for m in http.get("/v4/models").json()["models"]}
    base = models["tiny-llama"]
    for model_id in ("tiny-lora", "tiny-lora-chat"):
        entry = models[model_id]
        assert entry["base"] == "tiny-llama"
        assert entry["adapter"] == "builtin:tiny-llama-lora"
        assert entry["source"] is None
        assert (entry["engine"], entry["state"], entry["load_seconds"]) == (
            base["engine"],
            "ready",
            base["load_seconds"],
        )
    log = lora_server.log()
    assert log.count("loading model ") == 1
    assert "model tiny-llama serves LoRA adapters tiny-lora, tiny-lora-chat" in log


@pytest.mark.slow
def test_an_adapter_that_cannot_load_leaves_its_base_serving(client: SGPClient, lora_server: RunningServer) -> None:
    with lora_server.client() as http:
        response = http.post("/v4/completions", json={"model": "tiny-lora-missing", "prompt": PROMPT})
        models = {m["id"]: m for m in http.get("/v4/models").json()["models"]}
    assert response.status_code == 503, response.text
    message = response.json()["error"]["message"]
    assert "LoRA adapter 'tiny-lora-missing' failed to load" in message
    # The local path is an internal detail: the caller is told what failed, the log says where.
    assert "/nonexistent/tiny-lora" not in message
    assert "/nonexistent/tiny-lora/adapter_config.json" in lora_server.log()
    assert models["tiny-lora-missing"]["state"] == "failed"
    assert models["tiny-lora-missing"]["error"] in message
    assert models["tiny-llama"]["state"] == models["tiny-lora"]["state"] == "ready"
    assert complete(client, "tiny-lora", max_tokens=4)[1]["completion"] == 4


def test_engine_is_sized_for_the_adapters() -> None:
    from server.engines.vllm_engine import build_engine_args, lora_engine_args

    assert lora_engine_args([]) == {}
    local = AdapterRef("a", "/adapters/a", rank=8)
    assert lora_engine_args([local]) == {"enable_lora": True, "max_loras": 1, "max_lora_rank": 8}
    # The largest rank sizes the buffers; vLLM takes only some ranks, so 20 needs 32.
    larger = AdapterRef("b", "/adapters/b", rank=20)
    assert lora_engine_args([local, larger])["max_lora_rank"] == 32
    many = [AdapterRef(f"a{i}", f"/adapters/{i}", rank=8) for i in range(20)]
    assert lora_engine_args(many)["max_loras"] == 8
    # The base entry's engine_args have the last word.
    entry = ModelEntry(source="/models/base", engine_args={"max_lora_rank": 64})
    args = build_engine_args("base", entry, "/models/base", on_cpu=True, adapters=[local])
    assert (args.enable_lora, args.max_loras, args.max_lora_rank) == (True, 1, 64)


@pytest.mark.parametrize(
    ("base", "problem"),
    [
        ("no-such-model", "'no-such-model' is not a registered model ID"),
        ("tiny-lora", "'tiny-lora' is itself a LoRA adapter"),
        ("seq2seq", "LoRA adapters are served by vLLM, and 'seq2seq' uses engine 'transformers'"),
    ],
)
def test_adapter_base_must_be_a_vllm_model(tmp_path: Path, base: str, problem: str) -> None:
    overlay = tmp_path / "operator.yaml"
    overlay.write_text(
        "models:\n"
        "  seq2seq: {source: /models/t5, engine: transformers}\n"
        f"  bad-lora: {{base: {base}, adapter: /adapters/bad}}\n"
    )
    with pytest.raises(RegistryError) as raised:
        load_registry([FIXTURES / "lora_overlay.yaml", overlay])
    assert str(raised.value).startswith(f"{overlay}: model 'bad-lora': key 'base': {problem}")
