"""A client that goes away aborts its engine request, streaming or not.

The proof is the engine's own unfinished-request count (``running_requests`` in
``GET /v4/models``, read from vLLM's ``get_num_unfinished_requests``) returning to zero
long before the request could have finished, and the server logging the abort.
"""

from __future__ import annotations

import threading
import time

import httpx

from tests.conftest import API_KEY, RunningServer

# 2,000 tokens take the tiny model on one CPU core many seconds; an abort ends at once.
LONG = {
    "model": "tiny-llama",
    "prompt": "Hi",
    "model_parameters": {"temperature": 1.0, "max_tokens": 2000, "stop_sequences": ["never-appears-xyz"]},
}


def running(server: RunningServer) -> int:
    with server.client() as http:
        models = http.get("/v4/models").json()["models"]
    return next(m["running_requests"] for m in models if m["id"] == "tiny-llama")


def wait_for_running(server: RunningServer, predicate, timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate(running(server)):
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"running_requests never satisfied the condition (now {running(server)})")


def aborted_lines(server: RunningServer) -> int:
    return server.log().count("aborted: the client went away")


def test_streaming_disconnect_aborts_the_engine_request(server: RunningServer) -> None:
    wait_for_running(server, lambda n: n == 0, 60)
    before = aborted_lines(server)
    with httpx.Client(base_url=server.base_url, headers={"x-api-key": API_KEY}, timeout=60) as http:
        with http.stream("POST", "/v4/completions", json={**LONG, "stream": True}) as response:
            assert response.status_code == 200
            events = response.iter_lines()
            received = [line for _, line in zip(range(10), events)]
            assert any(line.startswith("data: ") for line in received)
            assert running(server) == 1
        # Leaving the block closes the connection mid-stream.
    assert wait_for_running(server, lambda n: n == 0, 10) < 10
    time.sleep(0.2)
    assert aborted_lines(server) == before + 1


def test_non_streaming_disconnect_aborts_the_engine_request(server: RunningServer) -> None:
    wait_for_running(server, lambda n: n == 0, 60)
    before = aborted_lines(server)
    outcome: dict[str, BaseException] = {}

    def call_and_give_up() -> None:
        try:
            httpx.post(
                server.base_url + "/v4/completions", json=LONG, headers={"x-api-key": API_KEY}, timeout=1.5
            )
        except httpx.TimeoutException as exc:  # the client gives up and closes the connection
            outcome["gave_up"] = exc

    caller = threading.Thread(target=call_and_give_up)
    caller.start()
    wait_for_running(server, lambda n: n == 1, 10)
    caller.join()
    assert "gave_up" in outcome, "the request finished before the client gave up; make it longer"
    assert wait_for_running(server, lambda n: n == 0, 10) < 10
    time.sleep(0.2)
    assert aborted_lines(server) == before + 1
