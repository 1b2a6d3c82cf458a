"""One Ray node on loopback for the Ray tests (tests/test_ray_*.py), shared by the session.

A real cluster has one node per machine; here the machine has one node, kept on
127.0.0.1 (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``: a second node on one machine would
bind its non-loopback address, and tests send traffic to loopback only). Two custom
resources, ``host_a`` and ``host_b``, stand for two nodes: an engine host asks for one,
and killing its process (SIGKILL) stands for losing that node. Token authentication is
off for this test node only (``RAY_AUTH_MODE=disabled``); production clusters keep it.

Ray's processes daemonise, so they are found again, and stopped, by the session's temp
directory in their command lines: only this session's, never another's.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
import pytest

from server.testing import LOOPBACK, free_port

if TYPE_CHECKING:
    from tests.conftest import RunningServer

# Every process of the node, the ingress and the driver need these.
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
HOSTS = ("host_a", "host_b")
RAY = Path(sys.executable).with_name("ray")
# Replicas start in a fresh Ray worker each (imports of torch and the server): generous.
REPLICAS_READY_SECONDS = 600.0


@dataclass
class RayNode:
    address: str  # HOST:PORT of the head, for --ray and ray.init
    temp_dir: Path

    def processes(self) -> list[psutil.Process]:
        """The node's processes (found by its temp directory) and everything they started."""
        found: dict[int, psutil.Process] = {}
        for process in psutil.process_iter(["cmdline"]):
            if process.pid == os.getpid():
                continue  # a caller that names the node on its own command line
            with contextlib.suppress(psutil.Error):
                # The Ray client server names the node's address, not its directory.
                marks = (str(self.temp_dir), self.address)
                if any(mark in part for part in process.info["cmdline"] or () for mark in marks):
                    found[process.pid] = process
                    for child in process.children(recursive=True):
                        found[child.pid] = child
        return list(found.values())

    def worker_pids(self) -> set[int]:
        """The node's Ray worker processes: the raylet's children."""
        raylets = [p for p in self.processes() if "raylet" in " ".join(_cmdline(p))]
        return {child.pid for raylet in raylets for child in _children(raylet)}

    def stop(self) -> None:
        """SIGKILL every process of this node (and what they started); remove its files."""
        for process in self.processes():
            with contextlib.suppress(psutil.Error):
                process.send_signal(signal.SIGKILL)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:
        return []


def _children(process: psutil.Process) -> list[psutil.Process]:
    try:
        return process.children()
    except psutil.Error:
        return []


def start_ray_node(resources: tuple[str, ...] = HOSTS, num_cpus: int = 2) -> RayNode:
    """``ray start --head`` on loopback, with one unit of each custom resource."""
    # Ray's Unix sockets live under the temp directory: its path must stay short.
    temp_dir = Path(tempfile.mkdtemp(prefix="v4r", dir="/tmp"))
    port = free_port()
    node = RayNode(f"{LOOPBACK}:{port}", temp_dir)
    command = [
        str(RAY),
        "start",
        "--head",
        "--node-ip-address",
        LOOPBACK,
        "--port",
        str(port),
        "--num-cpus",
        str(num_cpus),
        "--resources",
        "{" + ", ".join(f'"{name}": 1' for name in resources) + "}",
        "--temp-dir",
        str(temp_dir),
        "--ray-client-server-port",
        str(free_port()),
        "--include-dashboard",
        "false",
        "--disable-usage-stats",
    ]
    try:
        subprocess.run(command, env={**os.environ, **RAY_ENV}, check=True, capture_output=True, timeout=300)
    except BaseException:
        node.stop()
        raise
    return node


@pytest.fixture(scope="session")
def ray_node() -> Iterator[RayNode]:
    """The session's Ray node, stopped with everything it started at the end."""
    from tests.conftest import require_slow

    require_slow("starts a Ray node")
    node = start_ray_node()
    yield node
    node.stop()


def cluster_view(server: RunningServer) -> dict[str, Any]:
    """``GET /v4/cluster`` of an ingress: its replicas."""
    with server.client() as http:
        response = http.get("/v4/cluster")
    assert response.status_code == 200, response.text
    view: dict[str, Any] = response.json()
    return view


def start_ingress(
    node: RayNode, log_dir: Path, args: Sequence[str], *, replicas: int, registry_files: Sequence[Path] = ()
) -> RunningServer:
    """``v4serve serve --ray`` on ``node`` (API keys as the other tests'), returned once
    ``replicas`` replicas are ready."""
    from tests.conftest import start_server

    server = start_server(
        log_dir,
        registry_files=registry_files,
        extra_args=["--ray", node.address, *args],
        extra_env=RAY_ENV,
        wait_path="/healthz",
    )
    try:
        deadline = time.monotonic() + REPLICAS_READY_SECONDS
        while sum(r["ready"] for r in cluster_view(server)["replicas"]) < replicas:
            assert time.monotonic() < deadline, server.log_tail()
            time.sleep(0.5)
    except BaseException:
        server.stop()
        raise
    return server
