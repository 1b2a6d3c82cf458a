"""One source for configuration and its documentation.

Settings and registry keys are declared once, with a description, in server/settings.py
and server/registry/schema.py. The ``serve`` flags are generated from the settings, and
the docs' tables by scripts/gen_reference.py; these tests fail when a doc has drifted
from the code, or a declaration lacks what the generators need. No server, no engine.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path
from types import ModuleType

import pytest
from pydantic import BaseModel

from server import cli
from server.registry import load_registry
from server.registry.check import check_registry
from server.registry.schema import ModelEntry, RegistryFile, VisionSettings
from server.settings import Settings, options

REPO = Path(__file__).resolve().parents[1]


def _gen_reference() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_reference", REPO / "scripts" / "gen_reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_docs_tables_match_the_code(capsys: pytest.CaptureFixture[str]) -> None:
    status = _gen_reference().main(["--check"])
    assert status == 0, "run .venv/bin/python scripts/gen_reference.py\n" + capsys.readouterr().err


def test_check_mode_finds_a_stale_table_and_writing_fixes_it(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    shutil.copytree(REPO / "docs", docs)
    registry_md = docs / "registry.md"
    original = registry_md.read_text(encoding="utf-8")
    registry_md.write_text(original.replace("| `pinned` |", "| `pined` |"), encoding="utf-8")
    gen = _gen_reference()
    assert gen.main(["--check", "--docs", str(docs)]) == 1
    assert gen.main(["--docs", str(docs)]) == 0
    assert registry_md.read_text(encoding="utf-8") == original
    assert gen.main(["--check", "--docs", str(docs)]) == 0


@pytest.mark.parametrize("model", [Settings, ModelEntry, VisionSettings, RegistryFile])
def test_every_field_has_a_description(model: type[BaseModel]) -> None:
    assert [name for name, field in model.model_fields.items() if not field.description] == []


def test_every_setting_but_the_api_keys_is_a_serve_flag() -> None:
    assert cli._parser().parse_args(["serve"]).command == "serve"
    flags = {option.name: option.flag for option in options()}
    assert set(flags) == set(Settings.model_fields)
    assert [name for name, flag in flags.items() if flag is None] == ["api_keys"]
    # The flags that existed before they were generated keep their names.
    for name, flag in [
        ("host", "--host"),
        ("port", "--port"),
        ("registry_files", "--registry"),
        ("preload", "--preload"),
        ("api_keys_file", "--api-keys-file"),
        ("home", "--home"),
        ("log_level", "--log-level"),
        ("memory_budget", "--memory-budget"),
        ("keep_alive", "--keep-alive"),
        ("sleep_mode", "--sleep-mode"),
        ("shutdown_timeout", "--shutdown-timeout"),
    ]:
        assert flags[name] == flag


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.startswith("V4SERVE_"):
            monkeypatch.delenv(name)
    return monkeypatch


def _settings(*argv: str) -> Settings:
    return cli._settings(cli._parser().parse_args(list(argv)))


def test_flags_become_settings(clean_env: pytest.MonkeyPatch) -> None:
    settings = _settings(
        "serve",
        "--registry",
        "a.yaml",
        "--registry",
        "b.yaml",
        "--preload",
        "tiny",
        "--preload",
        "tiny-llava",
        "--sleep-mode",
        "--memory-budget",
        "70GiB",
        "--port",
        "9000",
        "--keep-alive",
        "2.5",
        "--log-level",
        "debug",
        "--image-format",
        "png",
        "--image-allow-private-networks",
        "--shutdown-timeout",
        "0.5",
    )
    assert settings.registry_files == [Path("a.yaml"), Path("b.yaml")]
    assert settings.preload == ["tiny", "tiny-llava"]
    assert settings.sleep_mode is True
    assert settings.memory_budget == 70 << 30
    assert (settings.port, settings.keep_alive, settings.log_level) == (9000, 2.5, "debug")
    assert settings.image_formats == ["png"]
    assert settings.image_allow_private_networks is True
    assert settings.shutdown_timeout == 0.5
    # What was not given keeps its default.
    assert settings.load_timeout == 900.0
    assert settings.image_allowed_domains == []


def test_a_flag_wins_over_its_variable_and_an_absent_flag_leaves_it(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("V4SERVE_PORT", "9001")
    clean_env.setenv("V4SERVE_SLEEP_MODE", "true")
    clean_env.setenv("V4SERVE_LOG_LEVEL", "WARNING")
    assert _settings("serve").port == 9001
    assert _settings("serve").sleep_mode is True
    assert _settings("serve").log_level == "warning"
    assert _settings("serve", "--port", "9002").port == 9002
    assert _settings("check", "--registry", "x.yaml").registry_files == [Path("x.yaml")]


def test_a_bad_flag_value_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli._parser().parse_args(["serve", "--port", "eighty"])
    assert exit_.value.code == 2
    assert "--port" in capsys.readouterr().err


def test_check_warns_when_memory_is_below_the_weights(tmp_path: Path) -> None:
    overlay = tmp_path / "operator.yaml"
    overlay.write_text(
        "models:\n"
        "  too-small: {source: example-org/a, parameters_b: 7, dtype: bfloat16, memory: 10GiB}\n"
        "  fits: {source: example-org/b, parameters_b: 7, dtype: bfloat16, memory: 24GiB}\n"
        "  float32: {source: example-org/c, parameters_b: 7, dtype: float32, memory: 24GiB}\n"
        "  quantized: {source: example-org/d, parameters_b: 20, weight_bits: 4.5, memory: 16GiB}\n",
        encoding="utf-8",
    )
    # No architecture: check warns about that too, but imports no engine to say so.
    problems = check_registry(load_registry([overlay], shipped=None))
    memory = {p.model_id: p for p in problems if p.key == "memory"}
    assert set(memory) == {"too-small", "float32"}
    assert all(p.warning for p in memory.values())
    assert "7B parameters take at 16 bits each" in memory["too-small"].message
    assert "at 32 bits each" in memory["float32"].message
