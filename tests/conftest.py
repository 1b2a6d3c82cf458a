"""Shared fixtures, and the two layers of this suite.

The fast layer calls the real application in this process (tests/in_process.py): the
real ``create_app``, middleware, routes, service and ``EnginePool``, with stand-in engines
behind the pool. It tests the HTTP edge (authentication, errors and their JSON, body
limits, SSE framing, routes, validation, account attribution, readiness) and every unit
that needs no model, in seconds::

    .venv/bin/python -m pytest -m "not slow"

The slow layer runs ``v4serve`` as a user would: a real process (``python -m server
serve``, started by ``server.testing``) on a free loopback port, with the real vLLM or
transformers engine and the tiny builtin models generated into a cache under the
repository (they are deterministic, so reusing them across runs is safe). Nothing there is
mocked; it tests what needs a model: outputs against the engines, streaming equality, stop
sequences, token counts, disconnect aborts, engine failures, LoRA, vision, the SDK
contract, shutdown, the CLI.

Markers (registered in pyproject.toml):

``slow``
    The test starts a real server process, runs the ``v4serve`` CLI as a process, starts
    a real engine, or runs a real model (the tiny ones too: on a busy machine torch
    takes seconds per step). ``start_server`` and ``tests.offline`` refuse to run for a
    test without the mark, so the fast layer stays fast. A module of such tests says so
    once: ``pytestmark = pytest.mark.slow``.
``gpu``
    The test needs a GPU; it is skipped on a machine without one (no machine that runs
    this suite today has one). Mark such a test ``slow`` too.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from server.testing import ServerProcess, server_env

if TYPE_CHECKING:
    from tests.in_process import InProcessServer

REPO = Path(__file__).resolve().parents[1]
TEST_HOME = Path(os.environ.get("V4SERVE_TEST_HOME", REPO / ".cache" / "test-home"))
API_KEY = "test-key"
ACCOUNT = "acct-1"
OTHER_KEY = "other-key"
# As V4SERVE_API_KEYS takes them: API_KEY is bound to ACCOUNT, OTHER_KEY to none.
API_KEYS = f"{API_KEY}:{ACCOUNT},{OTHER_KEY}"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
# The session's Ray node for the Ray tests (tests/ray_cluster.py; started only when asked for).
pytest_plugins = ["tests.ray_cluster"]

# ----- markers ---------------------------------------------------------------------------

_current: pytest.Item | None = None


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    # Before the item's fixtures are set up: a module's server starts in its first test.
    global _current
    _current = item


def require_slow(what: str) -> None:
    """Fail the running test if it is not marked ``slow``: it is about to do ``what``."""
    if _current is not None and _current.get_closest_marker("slow") is None:
        pytest.fail(
            f"{_current.nodeid} {what}, so it belongs to the slow layer: mark it "
            "@pytest.mark.slow (or the module: pytestmark = pytest.mark.slow); see tests/conftest.py",
            pytrace=False,
        )


def _has_gpu() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return False
    return "GPU" in listed.stdout


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_tests = [item for item in items if item.get_closest_marker("gpu") is not None]
    if gpu_tests and not _has_gpu():
        skip = pytest.mark.skip(reason="needs a GPU; this machine has none")
        for item in gpu_tests:
            item.add_marker(skip)


# ----- the slow layer: real servers --------------------------------------------------------


class RunningServer(ServerProcess):
    """A real server, with what the tests ask of it."""

    def client(self, api_key: str | None = API_KEY, timeout: float = 120.0) -> httpx.Client:
        headers = {"x-api-key": api_key} if api_key else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def aborted_token_counts(self) -> list[int]:
        """completion_tokens of every request the server logged as aborted by its client."""
        return [int(m) for m in re.findall(r"completion_tokens=(\d+) aborted: the client went away", self.log())]

    def wait_for_aborts(self, count: int, timeout: float = 60) -> list[int]:
        """The aborted requests' token counts once ``count`` are logged (the log line follows
        the abort; ``timeout`` only bounds a failing test)."""
        deadline = time.monotonic() + timeout
        while len(counts := self.aborted_token_counts()) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(counts) == count, f"expected {count} aborted requests in the log, found {len(counts)}"
        return counts

    def running_requests(self, model: str) -> int:
        """The engine's in-flight count for ``model``, as ``GET /v4/models`` reports it."""
        with self.client() as http:
            models = http.get("/v4/models").json()["models"]
        return int(next(m["running_requests"] for m in models if m["id"] == model))

    def wait_for_running(self, model: str, predicate: Callable[[int], bool], timeout: float) -> float:
        """Seconds until ``predicate(running_requests)`` holds; fails after ``timeout``."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if predicate(self.running_requests(model)):
                return time.monotonic() - start
            time.sleep(0.05)
        now = self.running_requests(model)
        raise AssertionError(f"running_requests never satisfied the condition (now {now})")


def start_server(
    log_dir: Path,
    *,
    registry_files: Sequence[Path] = (),
    preload: Sequence[str] = (),
    api_keys: str | None = API_KEYS,
    extra_args: Sequence[str] = (),
    extra_env: dict[str, str] | None = None,
    ready_timeout: float = 900.0,
    wait_path: str = "/readyz",
) -> RunningServer:
    """``v4serve serve`` on a free port with the test home, ready at ``wait_path``.

    ``api_keys`` as ``V4SERVE_API_KEYS`` (``None``: an open server); no other ``V4SERVE_``
    variable of this process reaches it, only ``extra_env``.
    """
    require_slow("starts a real server")
    args = ["--home", str(TEST_HOME)]
    for path in registry_files:
        args += ["--registry", str(path)]
    for name in preload:
        args += ["--preload", name]
    args += list(extra_args)
    env = server_env({"V4SERVE_API_KEYS": api_keys} if api_keys is not None else {})
    env.update(extra_env or {})
    return RunningServer.start(
        args, log_dir=log_dir, env=env, cwd=REPO, ready_path=wait_path, ready_timeout=ready_timeout
    )


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """One server for the contract tests: tiny-llama preloaded, tiny-chat loaded on demand."""
    running = start_server(
        tmp_path_factory.mktemp("server"),
        registry_files=[FIXTURES / "chat_overlay.yaml"],
        preload=["tiny-llama"],
    )
    yield running
    running.stop()


# ----- the fast layer: the application in process ----------------------------------------


@pytest.fixture
async def app_server(tmp_path: Path) -> AsyncIterator[InProcessServer]:
    """The application with the shipped registry and the test keys, in process; no model
    is loaded until a request asks for one (by a stand-in engine)."""
    from tests.in_process import serve_in_process

    async with serve_in_process(tmp_path) as running:
        yield running
