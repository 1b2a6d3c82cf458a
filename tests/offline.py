"""Running ``v4serve`` without a model hub, as every test here must.

No test may reach a hub, and none exists here: every command gets ``HF_HOME`` in the
test's own directory and ``HF_ENDPOINT`` on a closed loopback port, so a request that
slips through is refused on this machine instead of leaving it. Commands run as an
operator runs them: a real process, a real exit status.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from server.testing import free_port
from tests.conftest import REPO, require_slow


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    seconds: float


def offline_env(hf_home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("V4SERVE_", "HF_"))}
    env.update(HF_HOME=str(hf_home), HF_ENDPOINT=f"http://127.0.0.1:{free_port()}")
    env.update(extra)
    return env


def run_cli(args: Sequence[str], env: dict[str, str], timeout: float = 240) -> Result:
    return run_python(["-m", "server", *args], env, timeout)


def run_python(args: Sequence[str], env: dict[str, str], timeout: float = 240) -> Result:
    require_slow("runs v4serve as a process")
    started = time.monotonic()
    done = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    return Result(done.returncode, done.stdout, done.stderr, time.monotonic() - started)


def cached_snapshot(hf_home: Path, repo_id: str) -> Path:
    """A snapshot laid out as huggingface_hub caches a download; no hub exists to make one."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot
