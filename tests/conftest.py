"""Shared fixtures: the real ``v4serve`` process over HTTP, with the real vLLM engine.

Nothing here is mocked. Servers are started as a user would start them (``python -m
server serve``), on a free loopback port, with the tiny builtin models generated into a
cache under the repository (they are deterministic, so reusing them across runs is safe).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
TEST_HOME = Path(os.environ.get("V4SERVE_TEST_HOME", REPO / ".cache" / "test-home"))
API_KEY = "test-key"
ACCOUNT = "acct-1"
OTHER_KEY = "other-key"
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RunningServer:
    base_url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client(self, api_key: str | None = API_KEY, timeout: float = 120.0) -> httpx.Client:
        headers = {"x-api-key": api_key} if api_key else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def running_requests(self, model: str) -> int:
        """The engine's in-flight count for ``model``, as ``GET /v4/models`` reports it."""
        with self.client() as http:
            models = http.get("/v4/models").json()["models"]
        return next(m["running_requests"] for m in models if m["id"] == model)

    def wait_for_running(self, model: str, predicate: Callable[[int], bool], timeout: float) -> float:
        """Seconds until ``predicate(running_requests)`` holds; fails after ``timeout``."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if predicate(self.running_requests(model)):
                return time.monotonic() - start
            time.sleep(0.05)
        now = self.running_requests(model)
        raise AssertionError(f"running_requests never satisfied the condition (now {now})")

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM as an operator would, then make sure no process of the group is left."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        return self.process.wait()


def start_server(
    log_dir: Path,
    *,
    registry_files: Sequence[Path] = (),
    preload: Sequence[str] = (),
    api_keys: str | None = f"{API_KEY}:{ACCOUNT},{OTHER_KEY}",
    extra_args: Sequence[str] = (),
    extra_env: dict[str, str] | None = None,
    ready_timeout: float = 300.0,
    wait_path: str = "/readyz",
) -> RunningServer:
    port = free_port()
    command = [sys.executable, "-m", "server", "serve", "--port", str(port), "--home", str(TEST_HOME)]
    for path in registry_files:
        command += ["--registry", str(path)]
    for name in preload:
        command += ["--preload", name]
    command += list(extra_args)
    env = {k: v for k, v in os.environ.items() if not k.startswith("V4SERVE_")}
    if api_keys is not None:
        env["V4SERVE_API_KEYS"] = api_keys
    env.update(extra_env or {})
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"server-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = RunningServer(f"http://127.0.0.1:{port}", process, log_path)
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{server.log()[-4000:]}")
        try:
            if httpx.get(server.base_url + wait_path, timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"server not ready after {ready_timeout} s:\n{server.log()[-4000:]}")


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
