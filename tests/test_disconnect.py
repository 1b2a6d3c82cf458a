"""A client that goes away aborts its engine request, streaming or not.

The proof is the engine's own unfinished-request count (``running_requests`` in
``GET /v4/models``, read from vLLM's ``get_num_unfinished_requests``) returning to zero
long before the request could have finished, and the server logging the abort.
"""

from __future__ import annotations

import re
import time

import httpx
import pytest

from tests.conftest import API_KEY, RunningServer

MODEL = "tiny-llama"
# 2,000 tokens take the tiny model on one CPU core many seconds; an abort ends at once.
LONG = {
    "model": MODEL,
    # Greedy "Hello" runs the tiny model to the full 2,000 tokens: no early end of sequence.
    "prompt": "Hello",
    "model_parameters": {"temperature": 0, "max_tokens": 2000, "stop_sequences": ["never-appears-xyz"]},
}


def aborted_token_counts(server: RunningServer) -> list[int]:
    """completion_tokens of every request the server logged as aborted."""
    return [
        int(m) for m in re.findall(r"completion_tokens=(\d+) aborted: the client went away", server.log())
    ]


def test_streaming_disconnect_aborts_the_engine_request(server: RunningServer) -> None:
    server.wait_for_running(MODEL, lambda n: n == 0, 60)
    before = aborted_token_counts(server)
    with httpx.Client(base_url=server.base_url, headers={"x-api-key": API_KEY}, timeout=60) as http:
        with http.stream("POST", "/v4/completions", json={**LONG, "stream": True}) as response:
            assert response.status_code == 200
            events = response.iter_lines()
            received = [line for _, line in zip(range(10), events)]
            assert any(line.startswith("data: ") for line in received)
        # Leaving the block closes the connection mid-stream.
    assert server.wait_for_running(MODEL, lambda n: n == 0, 10) < 10
    time.sleep(0.2)
    after = aborted_token_counts(server)
    assert len(after) == len(before) + 1
    assert after[-1] < 2000, "the stream ended before the client left; nothing was aborted"


def test_non_streaming_disconnect_aborts_the_engine_request(server: RunningServer) -> None:
    server.wait_for_running(MODEL, lambda n: n == 0, 60)
    before = aborted_token_counts(server)
    # The client gives up after 1.5 s without an answer and closes the connection.
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.base_url + "/v4/completions", json=LONG, headers={"x-api-key": API_KEY}, timeout=1.5)
    assert server.wait_for_running(MODEL, lambda n: n == 0, 10) < 10
    time.sleep(0.2)
    after = aborted_token_counts(server)
    assert len(after) == len(before) + 1
    assert after[-1] < 2000
