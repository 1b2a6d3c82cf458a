"""Many models on one machine: on-demand loading, memory budget, LRU eviction, keep-alive,
overload. Three tiny models of 1 GiB each under a 2.5 GiB budget: two fit at a time."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import API_KEY, FIXTURES, RunningServer, start_server

pytestmark = pytest.mark.slow

SHORT = {"temperature": 0, "max_tokens": 5}
# Greedy "Hello" runs the tiny model to the full 2,000 tokens (no EOS): seconds of work.
LONG = {"temperature": 0, "max_tokens": 2000, "stop_sequences": ["never-appears-xyz"]}


@pytest.fixture(scope="module")
def pool_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    server = start_server(
        tmp_path_factory.mktemp("multi"),
        registry_files=[FIXTURES / "multi_overlay.yaml"],
        extra_args=["--memory-budget", "2.5GiB"],
        wait_path="/healthz",
    )
    yield server
    server.stop()


def complete(server: RunningServer, model: str, params: dict = SHORT, timeout: float = 300) -> httpx.Response:
    return httpx.post(
        server.base_url + "/v4/completions",
        json={"model": model, "prompt": "Hello", "model_parameters": params},
        headers={"x-api-key": API_KEY},
        timeout=timeout,
    )


def states(server: RunningServer) -> dict[str, dict]:
    with server.client() as http:
        return {m["id"]: m for m in http.get("/v4/models").json()["models"]}


def loads_of(server: RunningServer, model: str) -> int:
    return server.log().count(f"loading model {model} from")


def test_concurrent_first_requests_cause_one_load(pool_server: RunningServer) -> None:
    assert states(pool_server)["tiny-b"]["state"] == "not_loaded"
    results: list[int] = []
    threads = [
        threading.Thread(target=lambda: results.append(complete(pool_server, "tiny-b").status_code)) for _ in range(6)
    ]
    for thread in threads:
        thread.start()
    # The requests wait on the one load (an engine start takes seconds: seen while it runs).
    seen = {states(pool_server)["tiny-b"]["state"]}
    while "loading" not in seen and any(thread.is_alive() for thread in threads):
        seen.add(states(pool_server)["tiny-b"]["state"])
    assert "loading" in seen
    for thread in threads:
        thread.join()
    assert results == [200] * 6
    assert loads_of(pool_server, "tiny-b") == 1


def test_least_recently_used_idle_model_is_evicted(pool_server: RunningServer) -> None:
    assert complete(pool_server, "tiny-b").status_code == 200
    assert complete(pool_server, "tiny-a").status_code == 200  # loads; a and b fill 2 of 2.5 GiB
    now = states(pool_server)
    assert (now["tiny-a"]["state"], now["tiny-b"]["state"]) == ("ready", "ready")
    assert now["tiny-a"]["memory_bytes"] == 1 << 30

    assert complete(pool_server, "tiny-c").status_code == 200  # needs room: b was used longest ago
    now = states(pool_server)
    assert now["tiny-a"]["state"] == "ready"
    assert now["tiny-b"]["state"] == "not_loaded"
    assert now["tiny-c"]["state"] == "ready"
    assert "unloading model tiny-b to make room for tiny-c" in pool_server.log()


def test_keep_alive_unloads_an_unused_model(pool_server: RunningServer) -> None:
    assert complete(pool_server, "tiny-c").status_code == 200
    assert states(pool_server)["tiny-c"]["state"] == "ready"
    deadline = time.monotonic() + 30
    while states(pool_server)["tiny-c"]["state"] != "not_loaded":
        assert time.monotonic() < deadline, "tiny-c was never unloaded"
        time.sleep(0.5)
    assert "unloading model tiny-c after 4 s unused (keep-alive)" in pool_server.log()
    # The memory it held is free again: b loads without evicting a.
    assert complete(pool_server, "tiny-b").status_code == 200
    now = states(pool_server)
    assert (now["tiny-a"]["state"], now["tiny-b"]["state"]) == ("ready", "ready")


def test_model_larger_than_the_budget_fails_with_a_reason(pool_server: RunningServer) -> None:
    response = complete(pool_server, "tiny-huge")
    assert response.status_code == 503
    assert "memory budget" in response.json()["error"]["message"]
    assert "Retry-After" in response.headers
    status = states(pool_server)["tiny-huge"]
    assert status["state"] == "failed"
    assert "memory budget" in status["error"]
    # Nothing else was unloaded to try.
    assert states(pool_server)["tiny-a"]["state"] == "ready"


async def test_requests_past_the_queue_limit_get_429_with_retry_after(pool_server: RunningServer) -> None:
    # tiny-a admits 1 running and 1 queued request; each of these runs for seconds, so
    # of six sent at once at most two are admitted and the rest are told to come back.
    assert complete(pool_server, "tiny-a").status_code == 200

    async with httpx.AsyncClient(
        base_url=pool_server.base_url,
        headers={"x-api-key": API_KEY},
        timeout=300,
        limits=httpx.Limits(max_connections=10),
    ) as http:

        async def send(model: str, params: dict) -> httpx.Response:
            body = {"model": model, "prompt": "Hello", "model_parameters": params}
            return await http.post("/v4/completions", json=body)

        long_ones = [asyncio.ensure_future(send("tiny-a", LONG)) for _ in range(6)]
        # Other models are not held up by tiny-a's queue.
        assert (await send("tiny-b", SHORT)).status_code == 200
        responses = await asyncio.gather(*long_ones)

    refused = [r for r in responses if r.status_code == 429]
    served = [r for r in responses if r.status_code == 200]
    assert len(refused) + len(served) == 6
    assert len(refused) >= 3 and 1 <= len(served) <= 3
    for response in refused:
        assert int(response.headers["Retry-After"]) >= 1
        assert "limit of 1 running and 1 queued" in response.json()["error"]["message"]
    assert all(r.json()["token_usage"]["completion"] == 2000 for r in served)
    assert states(pool_server)["tiny-a"]["queued_requests"] == 0
