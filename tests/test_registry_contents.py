"""The shipped registry: every open model of the hosted API's list, and clear load errors.

``v4serve models`` is read as an operator reads it, from a real process. Loading errors
must name the file, the model and the key, because the reader has the YAML open.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from server.errors import ModelNotFoundError
from server.pool import EnginePool
from server.registry import RegistryError, load_registry
from tests.offline import cached_snapshot, offline_env, run_cli

# The open-model IDs of the hosted API's public list (v4-completions contract).
CONTRACT_OPEN_IDS = [
    "llama-7b",
    "llama-2-7b",
    "llama-2-7b-chat",
    "llama-2-13b",
    "llama-2-13b-chat",
    "llama-2-70b",
    "llama-2-70b-chat",
    "llama-3-8b",
    "llama-3-8b-instruct",
    "llama-3-1-8b-instruct",
    "llama-3-1-70b-instruct",
    "llama-3-70b-instruct",
    "Meta-Llama-3-8B-Instruct-RMU",
    "Meta-Llama-3-8B-Instruct-RR",
    "Meta-Llama-3-8B-Instruct-DERTA",
    "Meta-Llama-3-8B-Instruct-LAT",
    "falcon-7b",
    "falcon-7b-instruct",
    "falcon-40b",
    "falcon-40b-instruct",
    "mpt-7b",
    "mpt-7b-instruct",
    "flan-t5-xxl",
    "mistral-7b",
    "mistral-7b-instruct",
    "mixtral-8x7b",
    "mixtral-8x7b-instruct",
    "mixtral-8x22b-instruct",
    "llm-jp-13b-instruct-full",
    "llm-jp-13b-instruct-full-dolly",
    "zephyr-7b-alpha",
    "zephyr-7b-beta",
    "zephyr-cat-merged",
    "codellama-7b",
    "codellama-7b-instruct",
    "codellama-13b",
    "codellama-13b-instruct",
    "codellama-34b",
    "codellama-34b-instruct",
    "phi-3-mini-4k-instruct",
    "phi-3-cat-merged",
    "dolphin-2.9-llama3-8b",
    "dolphin-2.9-llama3-70b",
]


def test_the_shipped_registry_serves_every_open_id_of_the_contract() -> None:
    registry = load_registry()
    for model_id in CONTRACT_OPEN_IDS:
        registered = registry.resolve(model_id)
        assert registered is not None, f"{model_id} is not in the shipped registry"
        # Served under its own ID (not an alias of another model), from open weights.
        assert registered.model_id == model_id
        assert model_id not in registry.hosted_vendor_ids
        assert registered.entry.source or registered.entry.adapter, f"{model_id} names no weights"


@pytest.mark.slow
def test_models_lists_every_open_id_of_the_contract(tmp_path: Path) -> None:
    home = tmp_path / "home"
    result = run_cli(["models", "--home", str(home)], offline_env(tmp_path / "hf"))
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["ID", "SOURCE", "ARCHITECTURE", "ENGINE", "CONTEXT", "GPUS", "LOCAL"]
    table = {row.split()[0]: row.split() for row in rows}
    assert set(CONTRACT_OPEN_IDS) <= set(table)
    # Nothing is cached in this fresh HF_HOME, and tiny-llama is not generated in `home`.
    assert {row[-1] for row in table.values()} == {"no"}
    assert table["llama-2-7b"][1] == "meta-llama/Llama-2-7b-hf"
    assert table["falcon-7b"][-2] == "1"
    assert table["flan-t5-xxl"][3] == "transformers"
    # A LoRA entry shows base + adapter, and its base's facts.
    assert table["zephyr-cat-merged"][1:4] == ["zephyr-7b-beta", "+", "ContinuousAT/Zephyr-CAT"]
    assert table["zephyr-cat-merged"][4:8] == ["MistralForCausalLM", "vllm", "32768", "1"]


@pytest.mark.slow
def test_models_sees_weights_already_in_the_hf_cache(tmp_path: Path) -> None:
    hf_home = tmp_path / "hf"
    cached_snapshot(hf_home, "example-org/cached-model")
    overlay = tmp_path / "operator.yaml"
    overlay.write_text(
        "models:\n"
        "  cached: {source: example-org/cached-model}\n"
        "  not-cached: {source: example-org/other-model}\n"
        f"  local: {{source: {tmp_path}}}\n"
    )
    result = run_cli(["models", "--registry", str(overlay)], offline_env(hf_home))
    assert result.returncode == 0, result.stderr
    present = {row.split()[0]: row.split()[-1] for row in result.stdout.splitlines()[1:]}
    assert present["cached"] == "yes"
    assert present["not-cached"] == "no"
    assert present["local"] == "yes"


@pytest.mark.parametrize(
    ("entry", "key", "complaint"),
    [
        ("dtpye: float16", "dtpye", "Extra inputs are not permitted"),
        ("dtype: float8", "dtype", "Input should be"),
        ("vision: {placeholder: '<image>', max_image: 2}", "vision.max_image", "Extra inputs are not permitted"),
        ("vision: {max_images: 2}", "vision.placeholder", "Field required"),
        ("engine: transformers\n    vision: {placeholder: '<image>'}", "vision", "needs engine: vllm"),
    ],
)
def test_load_errors_name_file_model_and_key(tmp_path: Path, entry: str, key: str, complaint: str) -> None:
    overlay = tmp_path / "operator.yaml"
    overlay.write_text(f"models:\n  my-model:\n    source: example-org/my-model\n    {entry}\n")
    with pytest.raises(RegistryError) as caught:
        load_registry([overlay])
    message = str(caught.value)
    assert message.startswith(f"{overlay}: model 'my-model': key '{key}': "), message
    assert complaint in message


def test_hosted_vendor_id_is_404_with_how_to_alias_it(tmp_path: Path) -> None:
    pool = EnginePool(load_registry(), home=tmp_path)
    with pytest.raises(ModelNotFoundError) as caught:
        pool.lookup("gpt-4")
    assert caught.value.status_code == 404
    message = caught.value.message
    assert "hosted vendor model with no open weights" in message
    assert "aliases: {gpt-4: llama-3-1-70b-instruct}" in message
    assert "v4serve serve --registry FILE" in message
    # A name nobody knows keeps the plain not-found message.
    with pytest.raises(ModelNotFoundError, match="is not in the registry"):
        pool.lookup("no-such-model")


def test_operator_alias_serves_a_hosted_vendor_id(tmp_path: Path) -> None:
    overlay = tmp_path / "operator.yaml"
    overlay.write_text("aliases:\n  gpt-4: tiny-llama\n")
    pool = EnginePool(load_registry([overlay]), home=tmp_path)
    assert pool.lookup("gpt-4").model_id == "tiny-llama"
