"""The real process: open mode binds loopback, and start-up refuses bad registries and keys.

What the running application does with keys, health and readiness is tested in process,
in tests/test_http_edge.py.
"""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest

from tests.conftest import REPO, start_server

pytestmark = pytest.mark.slow


def test_open_server_binds_loopback_and_says_so(tmp_path) -> None:
    # No keys, no preload: the server starts without loading an engine. (What an open
    # server serves, docs included, is tested in process: tests/test_http_edge.py.)
    server = start_server(tmp_path, api_keys=None, wait_path="/healthz", ready_timeout=120)
    try:
        assert "without authentication, bound to 127.0.0.1 only" in server.log()
        response = httpx.get(server.base_url + "/v4/models", timeout=30)
        assert response.status_code == 200
        # Nothing preloaded: ready at once.
        assert httpx.get(server.base_url + "/readyz").status_code == 200
    finally:
        server.stop()


def _serve_with(tmp_path, registry_text: str) -> subprocess.CompletedProcess[str]:
    bad = tmp_path / "operator.yaml"
    bad.write_text(registry_text)
    return subprocess.run(
        [sys.executable, "-m", "server", "serve", "--port", "0", "--registry", str(bad)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_bad_registry_key_fails_start_up_naming_file_model_and_key(tmp_path) -> None:
    result = _serve_with(tmp_path, "models:\n  my-finetune:\n    source: /data/ckpt\n    dtpye: float32\n")
    assert result.returncode == 2
    assert "operator.yaml" in result.stderr
    assert "model 'my-finetune'" in result.stderr
    assert "key 'dtpye'" in result.stderr


def test_bad_registry_value_fails_start_up(tmp_path) -> None:
    result = _serve_with(tmp_path, "models:\n  my-finetune:\n    source: /data/ckpt\n    dtype: float8\n")
    assert result.returncode == 2
    assert "model 'my-finetune': key 'dtype'" in result.stderr


def test_preload_of_unknown_model_fails_start_up(tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "server", "serve", "--port", "0", "--preload", "nope"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2
    assert "--preload nope" in result.stderr


def _serve_with_keys(tmp_path, env_keys: str | None = None, keys_file: str | None = None):
    """``v4serve serve`` with these keys; every case here must refuse to start."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("V4SERVE_")}
    command = [sys.executable, "-m", "server", "serve", "--port", "0", "--home", str(tmp_path / "home")]
    if env_keys is not None:
        env["V4SERVE_API_KEYS"] = env_keys
    if keys_file is not None:
        path = tmp_path / "keys.txt"
        path.write_text(keys_file, encoding="utf-8")
        command += ["--api-keys-file", str(path)]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=180, check=False)


@pytest.mark.parametrize(
    ("env_keys", "keys_file", "says"),
    [
        (":ops", None, "V4SERVE_API_KEYS item 1: empty API key"),
        ("good-key, :ops", None, "V4SERVE_API_KEYS item 2: empty API key"),
        (",", None, "V4SERVE_API_KEYS is set but holds no keys"),
        (None, "# keys for ops\n\n", "keys.txt holds no keys"),
        (None, "good-key\n :ops\n", "keys.txt line 2: empty API key"),
        (None, "cl\u00e9-secr\u00e8te:ops\n", "keys.txt line 1: API keys must be printable ASCII"),
        (None, "two words:ops\n", "keys.txt line 1: API keys must be printable ASCII without spaces"),
        ("same:team-a", "same:team-b\n", "the same key as V4SERVE_API_KEYS item 1"),
    ],
    ids=[
        "env-empty-key",
        "env-empty-second",
        "env-no-keys",
        "file-no-keys",
        "file-empty-key",
        "file-non-ascii",
        "file-space",
        "same-key-two-accounts",
    ],
)
def test_unusable_keys_refuse_start_up(tmp_path, env_keys, keys_file, says: str) -> None:
    result = _serve_with_keys(tmp_path, env_keys, keys_file)
    assert result.returncode == 2, result.stderr[-2000:]
    assert says in result.stderr
    assert "Traceback" not in result.stderr
    if keys_file is not None and "V4SERVE_API_KEYS" not in says:
        assert str(tmp_path / "keys.txt") in result.stderr
    # The refused key is never echoed: it is a secret, and the line number says where.
    assert "secr" not in result.stderr
