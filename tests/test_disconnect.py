"""A client that goes away aborts its engine request, streaming or not.

The proof is the engine's own unfinished-request count (``running_requests`` in
``GET /v4/models``, read from vLLM's ``get_num_unfinished_requests``) returning to zero
long before the request could have finished, and the server logging the abort.
"""

from __future__ import annotations

import itertools
import json
import socket
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


@pytest.fixture(scope="module", autouse=True)
def long_model_loaded(server: RunningServer) -> None:
    """Load the long-context model first, with time to spare: on a loaded machine an engine
    start can take minutes, which the tests' own client timeouts must not have to cover."""
    body = {"model": MODEL, "prompt": "Hello", "model_parameters": {"max_tokens": 1}}
    with httpx.Client(base_url=server.base_url, headers={"x-api-key": API_KEY}, timeout=900) as http:
        assert http.post("/v4/completions", json=body).status_code == 200


def test_streaming_disconnect_aborts_the_engine_request(server: RunningServer) -> None:
    server.wait_for_running(MODEL, lambda n: n == 0, 300)
    before = server.aborted_token_counts()
    with httpx.Client(base_url=server.base_url, headers={"x-api-key": API_KEY}, timeout=60) as http:
        with http.stream("POST", "/v4/completions", json={**LONG, "stream": True}) as response:
            assert response.status_code == 200
            events = response.iter_lines()
            received = list(itertools.islice(events, 10))
            assert any(line.startswith("data: ") for line in received)
        # Leaving the block closes the connection mid-stream.
    server.wait_for_running(MODEL, lambda n: n == 0, 120)
    after = server.wait_for_aborts(len(before) + 1)
    assert after[-1] < MAX_TOKENS, "the stream ended before the client left; nothing was aborted"


def test_non_streaming_disconnect_aborts_the_engine_request(server: RunningServer) -> None:
    server.wait_for_running(MODEL, lambda n: n == 0, 300)
    before = server.aborted_token_counts()
    # The request goes out on a raw connection, which the client closes once the engine is
    # running it (its own counter says so): no client timeout to race the machine's speed.
    address = httpx.URL(server.base_url)
    body = json.dumps(LONG).encode()
    head = (
        f"POST /v4/completions HTTP/1.1\r\nHost: {address.netloc.decode()}\r\nx-api-key: {API_KEY}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    )
    with socket.create_connection((address.host, address.port or 80)) as connection:
        connection.sendall(head.encode() + body)
        server.wait_for_running(MODEL, lambda n: n == 1, 300)
    server.wait_for_running(MODEL, lambda n: n == 0, 120)
    after = server.wait_for_aborts(len(before) + 1)
    assert after[-1] < MAX_TOKENS


def test_an_idle_connection_outlives_the_clients_own_expiry(server: RunningServer) -> None:
    """httpx, and the SDKs built on it, reuse a connection idle for up to 5 s; a server that
    closed idle connections at 5 s too (uvicorn's default) could close one just as a request
    goes out on it, which the client sees as a reset. The server keeps them for 75 s: a
    request on a connection idle for longer than the clients' expiry is still answered."""
    address = httpx.URL(server.base_url)
    request = f"GET /healthz HTTP/1.1\r\nHost: {address.netloc.decode()}\r\n\r\n".encode()
    with socket.create_connection((address.host, address.port or 80), timeout=60) as connection:
        replies = connection.makefile("rb")
        for pause in (0.0, 6.0):
            time.sleep(pause)  # longer than httpx's keepalive_expiry: a wait, not a speed bound
            connection.sendall(request)
            status = replies.readline()
            assert status.startswith(b"HTTP/1.1 200"), status
            length = 0
            while (line := replies.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            replies.read(length)
