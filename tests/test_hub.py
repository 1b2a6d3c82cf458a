"""Weights from the Hugging Face hub: pulls and loads fail fast when the hub is unreachable.

No hub exists here, and no test may reach one off this machine, so this is the one
place the project stands in for something: the hub is played by a closed loopback port
(connection refused) or by a loopback socket that accepts connections and never answers
(a firewall that drops packets). Everything else is real: the ``v4serve`` process,
huggingface_hub, the cache on disk.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import start_server
from tests.offline import cached_snapshot, offline_env, run_cli, run_python

pytestmark = pytest.mark.slow

FAST = 30.0


@pytest.fixture
def silent_hub() -> Iterator[str]:
    """A hub address that accepts connections and never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"


def test_pull_fails_fast_when_the_hub_refuses_connections(tmp_path: Path) -> None:
    result = run_cli(["pull", "llama-7b"], offline_env(tmp_path))
    assert result.returncode == 1
    assert result.seconds < FAST
    assert "'huggyllama/llama-7b' is not fully in the local Hugging Face cache" in result.stderr
    assert "cannot be reached" in result.stderr
    assert "Traceback" not in result.stderr


def test_pull_fails_fast_when_the_hub_never_answers(tmp_path: Path, silent_hub: str) -> None:
    env = offline_env(tmp_path, HF_ENDPOINT=silent_hub, HF_HUB_ETAG_TIMEOUT="3")
    result = run_cli(["pull", "llama-7b"], env)
    assert result.returncode == 1
    assert result.seconds < FAST
    assert f"the hub at {silent_hub} cannot be reached (timed out)" in result.stderr


def test_pull_names_gated_repos_up_front_without_a_token(tmp_path: Path) -> None:
    result = run_cli(["pull", "llama-2-7b", "llama-7b"], offline_env(tmp_path))
    notice, *_ = result.stderr.splitlines()
    assert "HF_TOKEN is not set, and these repos are gated: meta-llama/Llama-2-7b-hf;" in notice
    assert "huggyllama" not in notice


def test_pull_has_nothing_to_download_for_builtin_and_unknown_models(tmp_path: Path) -> None:
    result = run_cli(["pull", "tiny", "gpt-4"], offline_env(tmp_path))
    assert "tiny: builtin:tiny-llama is generated on first use; nothing to download" in result.stdout
    assert "model 'gpt-4' is a hosted vendor model with no open weights" in result.stderr
    assert result.returncode == 1


LOAD = """
import sys
from pathlib import Path
from server.weights import HubUnreachableError, resolve_source
try:
    print(resolve_source(sys.argv[1], Path(sys.argv[2])))
except HubUnreachableError as exc:
    print(f"HubUnreachableError: {exc}", file=sys.stderr)
    sys.exit(3)
"""


def test_loading_a_missing_hub_model_fails_fast(tmp_path: Path, silent_hub: str) -> None:
    env = offline_env(tmp_path, HF_ENDPOINT=silent_hub, HF_HUB_ETAG_TIMEOUT="3")
    result = run_python(["-c", LOAD, "example-org/missing-model", str(tmp_path)], env)
    assert result.returncode == 3, result.stderr
    assert result.seconds < FAST
    assert "HubUnreachableError: 'example-org/missing-model' is not fully in the local" in result.stderr
    assert "v4serve pull" in result.stderr


def test_loading_a_cached_hub_model_needs_no_hub(tmp_path: Path) -> None:
    snapshot = cached_snapshot(tmp_path, "example-org/cached-model")
    result = run_python(["-c", LOAD, "example-org/cached-model", str(tmp_path)], offline_env(tmp_path))
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()) == snapshot


def test_request_for_a_missing_hub_model_gets_a_fast_503(tmp_path: Path, silent_hub: str) -> None:
    """The whole path: HTTP request -> pool -> weight resolution, with the hub silent."""
    overlay = tmp_path / "operator.yaml"
    overlay.write_text("models:\n  missing: {source: example-org/missing-model}\n")
    env = offline_env(tmp_path / "hf", HF_ENDPOINT=silent_hub, HF_HUB_ETAG_TIMEOUT="3")
    server = start_server(tmp_path, registry_files=[overlay], extra_env=env)
    try:
        with server.client() as http:
            started = time.monotonic()
            response = http.post("/v4/completions", json={"model": "missing", "prompt": "Hi"})
            assert time.monotonic() - started < FAST
    finally:
        server.stop()
    assert response.status_code == 503, response.text
    message = response.json()["error"]["message"]
    assert "model 'missing' failed to load" in message
    assert "'example-org/missing-model' is not fully in the local Hugging Face cache" in message
    assert "cannot be reached (timed out)" in message
