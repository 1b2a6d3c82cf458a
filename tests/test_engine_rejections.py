"""What the real engine refuses: clear errors, and nothing leaks if a request slips through.

vLLM refuses some values only after a request was registered with it: a lone surrogate
fails its tokenizer or msgpack encoder, an integer past 64 bits overflows its encoder.
Each such value gets a 422 naming the field before the engine sees it (tested in process,
in tests/test_errors.py); here, the largest values the door lets through are served, and,
as a mechanism, any failure after the hand-over aborts the request in the engine, so the
engine's unfinished-request count (``running_requests``) returns to zero. What only the
engine knows (its context length) is refused with a 400, and the server keeps serving.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from server.errors import EngineError
from server.pool import EnginePool
from server.protocol.v4 import CompletionRequest, ModelParameters
from server.registry import load_registry
from server.service import CompletionService, ImagePolicy
from server.settings import Settings
from tests.conftest import API_KEY, TEST_HOME, RunningServer

pytestmark = pytest.mark.slow

MODEL = "tiny-llama"
GOOD = {"model": MODEL, "prompt": "Hello", "model_parameters": {"temperature": 0, "max_tokens": 3}}


def assert_error(response: httpx.Response, status: int, *, param: str | None = None, says: str = "") -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == status
    assert "Traceback" not in error["message"]
    if param is not None:
        assert error["param"] == param
    assert says.lower() in error["message"].lower()
    return error


def assert_still_serving(server: RunningServer) -> None:
    with server.client() as http:
        response = http.post("/v4/completions", json=GOOD)
    assert response.status_code == 200, response.text
    assert response.json()["token_usage"]["completion"] >= 1
    assert server.running_requests(MODEL) == 0


def test_largest_accepted_top_k_is_served(server: RunningServer) -> None:
    body = {
        "model": MODEL,
        "prompt": "Hello",
        "model_parameters": {"temperature": 1, "top_k": 2**31 - 1, "max_tokens": 3},
    }
    with server.client() as http:
        response = http.post("/v4/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["token_usage"]["completion"] >= 1


def test_a_request_the_engine_fails_after_hand_over_is_aborted_there(tmp_path: Path) -> None:
    """The mechanism, through the real pool, service and vLLM engine in this process.

    The HTTP layer would refuse ``top_k=2**64``; ``model_construct`` skips that check on
    purpose, to stand for any value the engine refuses after the request was handed to it.
    Before the fix, vLLM's output processor kept the request: running stayed at 1.
    """

    async def scenario() -> tuple[int, int]:
        settings = Settings(home=TEST_HOME)
        pool = EnginePool(load_registry([]), home=settings.home)
        service = CompletionService(pool, ImagePolicy.from_settings(settings))
        try:
            bad = CompletionRequest.model_construct(
                model=MODEL,
                prompt="Hello",
                account_id=None,
                images=None,
                stream=False,
                model_parameters=ModelParameters.model_construct(
                    temperature=1.0,
                    max_tokens=5,
                    stop_sequences=None,
                    top_k=2**64,
                    top_p=None,
                    presence_penalty=None,
                    frequency_penalty=None,
                    reasoning_effort=None,
                ),
            )
            pending = await service.prepare(bad)
            try:
                with pytest.raises(EngineError) as failure:
                    await pending.result()
            finally:
                pending.close()
            assert "OverflowError" in failure.value.message
            engine = (await pool.lease(MODEL)).engine
            running_after_failure = engine.stats().running
            # The engine still serves the next request.
            good = CompletionRequest(model=MODEL, prompt="Hello", model_parameters={"temperature": 0, "max_tokens": 3})
            again = await service.prepare(good)
            try:
                result = await again.result()
            finally:
                again.close()
            return running_after_failure, result.token_usage.completion
        finally:
            await pool.shutdown()

    running, completion_tokens = asyncio.run(scenario())
    assert running == 0
    assert completion_tokens == 3


def test_largest_max_tokens_is_refused_before_the_stream_begins(server: RunningServer) -> None:
    """Within the wire bound but past the context: 400 while the status can still say so."""
    body = {"model": MODEL, "prompt": "Hello", "stream": True, "model_parameters": {"max_tokens": 2**31 - 1}}
    with httpx.Client(base_url=server.base_url, headers={"x-api-key": API_KEY}, timeout=60) as http:
        response = http.post("/v4/completions", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "model_parameters.max_tokens"
    assert server.running_requests(MODEL) == 0


def test_prompt_longer_than_context_is_400_naming_both_lengths(server: RunningServer) -> None:
    with server.client() as http:
        body = {**GOOD, "prompt": "hello " * 3000}
        error = assert_error(http.post("/v4/completions", json=body), 400, says="2048")
        assert "maximum context length" in error["message"]
        # Streaming requests are refused the same way, before the stream starts.
        assert_error(http.post("/v4/completions", json={**body, "stream": True}), 400, says="2048")
    assert_still_serving(server)


def test_explicit_max_tokens_beyond_context_is_400(server: RunningServer) -> None:
    body = {**GOOD, "model_parameters": {**GOOD["model_parameters"], "max_tokens": 5000}}
    with server.client() as http:
        error = assert_error(
            http.post("/v4/completions", json=body),
            400,
            param="model_parameters.max_tokens",
            says="exceeds the context length",
        )
    assert "5000" in error["message"] and "2048" in error["message"]
    assert_still_serving(server)
