"""Engines that die or load slowly: 503 with Retry-After, restart, the others keep serving.

The server here waits at most 3 s for a load (V4SERVE_LOAD_TIMEOUT), less than a tiny
engine takes to start, so a first request meets a model that is still loading.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import httpx
import psutil
import pytest

from tests.conftest import API_KEY, FIXTURES, RunningServer, start_server

pytestmark = pytest.mark.slow

SHORT = {"temperature": 0, "max_tokens": 5}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    running = start_server(
        tmp_path_factory.mktemp("failure"),
        registry_files=[FIXTURES / "multi_overlay.yaml"],
        extra_env={"V4SERVE_LOAD_TIMEOUT": "3"},
        wait_path="/healthz",
    )
    yield running
    running.stop()


def complete(server: RunningServer, model: str, params: dict = SHORT) -> httpx.Response:
    return httpx.post(
        server.base_url + "/v4/completions",
        json={"model": model, "prompt": "Hello", "model_parameters": params},
        headers={"x-api-key": API_KEY},
        # Generous: a loaded CI machine can take minutes to start an engine.
        timeout=900,
    )


def state(server: RunningServer, model: str) -> dict:
    with server.client() as http:
        return next(m for m in http.get("/v4/models").json()["models"] if m["id"] == model)


def wait_until_ready(server: RunningServer, model: str, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while state(server, model)["state"] != "ready":
        assert time.monotonic() < deadline, f"{model} never became ready: {state(server, model)}"
        time.sleep(0.5)


def engine_cores(server: RunningServer) -> list[psutil.Process]:
    """The server's EngineCore processes, oldest first (one per loaded vLLM engine)."""
    children = psutil.Process(server.process.pid).children()
    cores = [p for p in children if "EngineCore" in " ".join(p.cmdline()) or p.name().startswith("VLLM::EngineCor")]
    return sorted(cores, key=lambda p: p.create_time())


def test_request_for_a_model_still_loading_gets_503_then_succeeds(server: RunningServer) -> None:
    response = complete(server, "tiny-b")
    assert response.status_code == 503
    assert "still loading" in response.json()["error"]["message"]
    assert int(response.headers["Retry-After"]) >= 1
    assert state(server, "tiny-b")["state"] == "loading"
    wait_until_ready(server, "tiny-b")
    assert complete(server, "tiny-b").status_code == 200
    assert server.log().count("loading model tiny-b from") == 1


def test_engine_killed_mid_stream(server: RunningServer) -> None:
    # tiny-b is loaded (previous test); load tiny-a after it, so its EngineCore is the newest.
    complete(server, "tiny-a")
    wait_until_ready(server, "tiny-a")
    cores = engine_cores(server)
    assert len(cores) == 2
    victim = cores[-1]

    body = {
        "model": "tiny-a",
        "prompt": "Hello",
        "stream": True,  # greedy: the full 2,000 tokens
        "model_parameters": {"temperature": 0, "max_tokens": 2000, "stop_sequences": ["never-xyz"]},
    }
    lines: list[str] = []
    with httpx.stream(
        "POST", server.base_url + "/v4/completions", json=body, headers={"x-api-key": API_KEY}, timeout=60
    ) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            lines.append(line)
            if len(lines) == 6:
                os.kill(victim.pid, signal.SIGKILL)
    assert "event: error" in lines, lines[-6:]
    error_data = lines[lines.index("event: error") + 1]
    assert '"code":503' in error_data.replace(" ", "")

    # The other model keeps serving while tiny-a is down.
    assert complete(server, "tiny-b").status_code == 200
    deadline = time.monotonic() + 30
    while state(server, "tiny-a")["state"] != "failed":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert "engine process died" in state(server, "tiny-a")["error"]

    # The next request restarts it (the first restart has no back-off); it is still
    # loading after 3 s, so that request gets 503, and a later one succeeds.
    restart = complete(server, "tiny-a")
    assert restart.status_code in (200, 503)
    wait_until_ready(server, "tiny-a")
    assert complete(server, "tiny-a").status_code == 200
    assert server.log().count("loading model tiny-a from") == 2
    assert not victim.is_running() or victim.status() == psutil.STATUS_ZOMBIE
