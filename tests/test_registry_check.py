"""``v4serve check``: a registry's problems found without weights, one line each.

The shipped registry must pass against the installed vLLM and transformers; each kind
of problem is then planted in a small operator file laid over it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from server.registry import RegistryError, load_registry
from server.registry.check import check_registry
from tests.offline import offline_env, run_cli

pytestmark = pytest.mark.slow


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_shipped_registry_passes(tmp_path: Path) -> None:
    result = run_cli(["check"], offline_env(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("ok: "), result.stdout
    assert "0 error(s)" in result.stdout


def test_unrunnable_architecture_and_tensor_parallelism_fail_the_check(tmp_path: Path) -> None:
    overlay = write(
        tmp_path / "operator.yaml",
        """
models:
  made-up:
    source: example-org/made-up
    architecture: NoSuchModelForCausalLM
  falcon-on-two:
    source: tiiuae/falcon-7b
    architecture: FalconForCausalLM
    attention_heads: 71
    tensor_parallel_size: 2
  mpt-on-vllm:
    source: mosaicml/mpt-7b
    architecture: MptForCausalLM
""",
    )
    result = run_cli(["check", "--registry", str(overlay)], offline_env(tmp_path))
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()

    def line_for(model_id: str, key: str) -> str:
        found = [line for line in lines if f"model '{model_id}': key '{key}'" in line]
        assert len(found) == 1, lines
        assert found[0].startswith(f"{overlay}: "), found[0]
        return found[0]

    assert "does not run 'NoSuchModelForCausalLM'" in line_for("made-up", "architecture")
    assert "2 does not divide the model's 71 attention heads" in line_for("falcon-on-two", "tensor_parallel_size")
    # vLLM dropped MPT; transformers still has it, and the line says what to change.
    assert "set engine: transformers" in line_for("mpt-on-vllm", "architecture")
    assert "3 error(s)" in lines[-1]


@pytest.mark.parametrize(
    ("models", "expected"),
    [
        (
            "orphan-lora: {base: no-such-base, adapter: example-org/some-lora}",
            "model 'orphan-lora': key 'base': 'no-such-base' is not a registered model",
        ),
        # The shipped tiny-llama already answers to "tiny".
        (
            "my-model: {source: example-org/my-model, aliases: [tiny]}",
            "model 'my-model': key 'aliases': 'tiny' is already the ID or an alias",
        ),
    ],
    ids=["adapter-without-base", "alias-defined-twice"],
)
def test_registry_that_does_not_load_fails_the_check(tmp_path: Path, models: str, expected: str) -> None:
    overlay = write(tmp_path / "operator.yaml", f"models:\n  {models}\n")
    result = run_cli(["check", "--registry", str(overlay)], offline_env(tmp_path))
    assert result.returncode == 1
    assert f"{overlay}: {expected}" in result.stdout


def test_top_level_alias_of_an_existing_id_is_refused(tmp_path: Path) -> None:
    overlay = write(tmp_path / "operator.yaml", "aliases:\n  llama-7b: tiny-llama\n")
    with pytest.raises(RegistryError, match=r"key 'aliases.llama-7b'.*already the ID"):
        load_registry([overlay])


def test_local_checkpoint_facts_come_from_its_config(tmp_path: Path) -> None:
    checkpoint = tmp_path / "my-checkpoint"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text(
        json.dumps({"architectures": ["LlamaForCausalLM"], "num_attention_heads": 6})
    )
    overlay = write(
        tmp_path / "operator.yaml",
        f"models:\n  mine:\n    source: {checkpoint}\n    tensor_parallel_size: 4\n",
    )
    problems = [p for p in check_registry(load_registry([overlay])) if p.model_id == "mine"]
    assert [(p.key, p.warning) for p in problems] == [("tensor_parallel_size", False)]
    assert "(sizes up to 8 that do: 1, 2, 3, 6)" in problems[0].message


def test_missing_architecture_is_a_warning_not_an_error(tmp_path: Path) -> None:
    overlay = write(
        tmp_path / "operator.yaml",
        "models:\n  unknown-arch:\n    source: example-org/unknown-arch\n",
    )
    problems = [p for p in check_registry(load_registry([overlay])) if p.model_id == "unknown-arch"]
    assert [(p.key, p.warning) for p in problems] == [("architecture", True)]
    assert str(problems[0]).startswith(f"{overlay}: warning: model 'unknown-arch'")


def test_transformers_engine_needs_a_transformers_class(tmp_path: Path) -> None:
    overlay = write(
        tmp_path / "operator.yaml",
        """
models:
  t5-ok:
    source: example-org/t5
    engine: transformers
    architecture: T5ForConditionalGeneration
  not-a-class:
    source: example-org/custom
    engine: transformers
    architecture: MPTForCausalLM
""",
    )
    problems = {p.model_id: p for p in check_registry(load_registry([overlay]))}
    assert "t5-ok" not in problems
    assert problems["not-a-class"].key == "architecture"
    assert "has no model class 'MPTForCausalLM'" in problems["not-a-class"].message
