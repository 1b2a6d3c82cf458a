"""A client that goes away aborts its engine request, streaming or not.

The proof is the engine's own unfinished-request count (``running_requests`` in
``GET /v4/models``, read from vLLM's ``get_num_unfinished_requests``) returning to zero
long before the request could have finished, and the server logging the abort.
"""

from __future__ import annotations

import itertools
import re
import time

import httpx
import pytest

from tests.conftest import API_KEY, RunningServer

pytestmark = pytest.mark.slow

MODEL = "tiny-llama-long"
MAX_TOKENS = 30_000
# Thousands of tokens take the tiny model tens of seconds on any CPU, far longer than the client
# takes to leave even on a loaded machine; an abort ends the request at once.
LONG = {
    "model": MODEL,
    # Greedy "Hello" runs the random-weight model for 7,459 tokens before its end of sequence:
    # thousands of tokens still to generate when the client leaves.
    "prompt": "Hello",
    "model_parameters": {"temperature": 0, "max_tokens": MAX_TOKENS, "stop_sequences": ["never-appears-xyz"]},
}


def aborted_token_counts(server: RunningServer) -> list[int]:
    """completion_tokens of every request the server logged as aborted."""
    return [int(m) for m in re.findall(r"completion_tokens=(\d+) aborted: the client went away", server.log())]


@pytest.fixture(scope="module", autouse=True)
def long_model_loaded(server: RunningServer) -> None:
    """Load the long-context model first, with time to spare: on a loaded machine an engine
    start can take minutes, which the tests' own client timeouts must not have to cover."""
    body = {"model": MODEL, "prompt": "Hello", "model_parameters": {"max_tokens": 1}}
    with httpx.Client(base_url=server.base_url, headers={"x-api-key": API_KEY}, timeout=900) as http:
        assert http.post("/v4/completions", json=body).status_code == 200


def wait_for_aborts(server: RunningServer, count: int, timeout: float = 10) -> list[int]:
    """The aborted requests' token counts once ``count`` are logged (the log line follows the abort)."""
    deadline = time.monotonic() + timeout
    while len(counts := aborted_token_counts(server)) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(counts) == count, f"expected {count} aborted requests in the log, found {len(counts)}"
    return counts


def test_streaming_disconnect_aborts_the_engine_request(server: RunningServer) -> None:
    server.wait_for_running(MODEL, lambda n: n == 0, 300)
    before = aborted_token_counts(server)
    with httpx.Client(base_url=server.base_url, headers={"x-api-key": API_KEY}, timeout=60) as http:
        with http.stream("POST", "/v4/completions", json={**LONG, "stream": True}) as response:
            assert response.status_code == 200
            events = response.iter_lines()
            received = list(itertools.islice(events, 10))
            assert any(line.startswith("data: ") for line in received)
        # Leaving the block closes the connection mid-stream.
    assert server.wait_for_running(MODEL, lambda n: n == 0, 10) < 10
    after = wait_for_aborts(server, len(before) + 1)
    assert after[-1] < MAX_TOKENS, "the stream ended before the client left; nothing was aborted"


def test_non_streaming_disconnect_aborts_the_engine_request(server: RunningServer) -> None:
    server.wait_for_running(MODEL, lambda n: n == 0, 300)
    before = aborted_token_counts(server)
    # The client gives up after 0.5 s. The model is loaded (fixture) and this greedy request
    # runs for 7,459 tokens (over 15,000 tok/s would be needed to finish first), so it is still running in
    # the engine when the client leaves; the proof is the engine's own counter and log.
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.base_url + "/v4/completions", json=LONG, headers={"x-api-key": API_KEY}, timeout=0.5)
    assert server.wait_for_running(MODEL, lambda n: n == 0, 60) < 60
    after = wait_for_aborts(server, len(before) + 1)
    assert after[-1] < MAX_TOKENS
