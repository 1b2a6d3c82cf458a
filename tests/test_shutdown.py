"""SIGTERM: no new requests, running ones finish up to a deadline, the rest are aborted,
and no engine process is left behind."""

from __future__ import annotations

import signal
import threading
import time

import httpx
import psutil
import pytest

from tests.conftest import API_KEY, RunningServer, start_server

pytestmark = pytest.mark.slow


def stream_in_background(server: RunningServer, max_tokens: int) -> tuple[threading.Thread, dict]:
    outcome: dict = {"lines": []}
    # Greedy "Hello" never reaches end of sequence within 2,000 tokens on the tiny model.
    body = {
        "model": "tiny-llama",
        "prompt": "Hello",
        "stream": True,
        "model_parameters": {"temperature": 0, "max_tokens": max_tokens, "stop_sequences": ["never-xyz"]},
    }

    def run() -> None:
        try:
            with httpx.stream(
                "POST", server.base_url + "/v4/completions", json=body, headers={"x-api-key": API_KEY}, timeout=120
            ) as response:
                for line in response.iter_lines():
                    outcome["lines"].append(line)
        except httpx.HTTPError as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 30
    while len(outcome["lines"]) < 4:
        assert time.monotonic() < deadline, "the stream never started"
        time.sleep(0.01)
    return thread, outcome


def descendants(server: RunningServer) -> list[psutil.Process]:
    return psutil.Process(server.process.pid).children(recursive=True)


def assert_all_gone(processes: list[psutil.Process]) -> None:
    deadline = time.monotonic() + 30
    for process in processes:
        while process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, f"engine process {process.pid} ({process.name()}) was left behind"
            time.sleep(0.2)


@pytest.mark.parametrize(
    ("grace", "max_tokens", "finishes"),
    [("30", 1000, True), ("1", 2000, False)],
    ids=["running-request-finishes", "deadline-aborts-the-rest"],
)
def test_sigterm_drains_then_stops_every_engine(tmp_path, grace: str, max_tokens: int, finishes: bool) -> None:
    server = start_server(tmp_path, preload=["tiny-llama"], extra_args=["--shutdown-timeout", grace])
    engine_processes = descendants(server)
    assert engine_processes, "the preloaded engine runs in child processes"
    thread, outcome = stream_in_background(server, max_tokens)

    server.process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    with pytest.raises(httpx.TransportError):  # no new connections once shutting down
        httpx.get(server.base_url + "/healthz", timeout=5)

    thread.join(timeout=120)
    # uvicorn re-raises the signal once shut down, so the exit is "killed by SIGTERM", as
    # process supervisors expect from a clean stop.
    assert server.process.wait(timeout=120) in (0, -signal.SIGTERM)
    final = [line for line in outcome["lines"] if line.startswith("data: ")][-1]
    if finishes:
        assert '"finish_reason":"length"' in final, final
        assert f'"completion":{max_tokens}' in final
    else:
        assert '"finish_reason":null' in final, "the stream should have been cut at the deadline"
        assert "aborted" in server.log()
    assert "shutting down model tiny-llama" in server.log()
    assert_all_gone(engine_processes)
    server.stop()
