"""Starting a real ``v4serve`` process, for tests and benchmarks.

A small public helper, as ``starlette.testclient`` is for Starlette: it runs the server as
an operator runs it (``python -m server serve`` in a process group of its own, on a free
loopback port), waits until it answers, and stops it with everything it started::

    from server.testing import ServerProcess

    with ServerProcess.start(["--preload", "tiny-llama"], log_dir=Path("logs")) as server:
        httpx.get(server.base_url + "/v4/models", headers={"x-api-key": "..."})

It imports nothing of the server itself: the process under test is the only copy of it.
To test the HTTP layer without a process, call the ASGI application in process instead
(``httpx.ASGITransport`` around ``server.api.create_app``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import httpx

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self from Python 3.11

LOOPBACK = "127.0.0.1"
# Where ``python -m server`` is found when the package is run from its source tree.
SOURCE_ROOT = Path(__file__).resolve().parents[1]
# How much of the server's log an error shows.
LOG_TAIL_CHARS = 4000


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port nothing listens on right now (the OS may hand it out again later)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def server_env(extra: Mapping[str, str] | None = None, *, drop: Sequence[str] = ("V4SERVE_",)) -> dict[str, str]:
    """This process's environment without the variables starting with one of ``drop``,
    then ``extra``: a server configured only by what the caller passes."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(tuple(drop))}
    env.update(extra or {})
    return env


@dataclass
class ServerProcess:
    """A ``v4serve serve`` process, its address and its log (stdout and stderr)."""

    base_url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @classmethod
    def launch(
        cls,
        args: Sequence[str] = (),
        *,
        log_dir: Path,
        env: Mapping[str, str] | None = None,
        port: int | None = None,
        cwd: Path = SOURCE_ROOT,
    ) -> Self:
        """Start ``python -m server serve --port PORT *args`` and return at once.

        ``env`` is the whole environment of the process (default: ``server_env()``). The
        log goes to ``log_dir/server-PORT.log``. The process leads a process group of its
        own, so ``stop`` also reaches the engine processes it starts.
        """
        port = free_port() if port is None else port
        command = [sys.executable, "-m", "server", "serve", "--port", str(port), *args]
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / f"server-{port}.log"
        with log_path.open("wb") as log:  # the child keeps its own copy of the file
            process = subprocess.Popen(
                command,
                cwd=cwd,
                env=dict(server_env() if env is None else env),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return cls(f"http://{LOOPBACK}:{port}", process, log_path)

    @classmethod
    def start(
        cls,
        args: Sequence[str] = (),
        *,
        log_dir: Path,
        env: Mapping[str, str] | None = None,
        port: int | None = None,
        cwd: Path = SOURCE_ROOT,
        ready_path: str = "/readyz",
        ready_timeout: float = 300.0,
    ) -> Self:
        """``launch``, then ``wait_ready``: a server that answers ``ready_path`` with 200.

        ``/readyz`` answers once the preloaded and pinned models are loaded; ``/healthz``
        as soon as the server listens. Raises ``RuntimeError`` (with the end of the log)
        if the process exits or is not ready in time, and then leaves nothing running.
        """
        server = cls.launch(args, log_dir=log_dir, env=env, port=port, cwd=cwd)
        try:
            server.wait_ready(ready_path, ready_timeout)
        except BaseException:
            server.stop()
            raise
        return server

    def wait_ready(self, path: str = "/readyz", timeout: float = 300.0) -> None:
        """Poll ``path`` until it answers 200; ``RuntimeError`` if the process exits first
        or ``timeout`` seconds pass."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(self.base_url + path, timeout=2).status_code == 200:
                    return
            time.sleep(0.5)
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.log_tail()}")

    def log(self) -> str:
        """Everything the server has written so far."""
        return self.log_path.read_text(errors="replace")

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        return self.log()[-chars:]

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM as an operator would (running requests get the server's grace time),
        then SIGKILL whatever of the process group is left; the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        return self.process.wait()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()
