"""Values an engine would refuse late are refused at the door, and nothing leaks if one slips.

vLLM refuses some values only after a request was registered with it: a lone surrogate
fails its tokenizer or msgpack encoder, an integer past 64 bits overflows its encoder.
Each such value must get a 422 naming the field before the engine sees it, and, as a
mechanism, any failure after the hand-over must abort the request in the engine, so the
engine's unfinished-request count (``running_requests``) returns to zero.
"""

from __future__ import annotations

import asyncio
import json
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

MODEL = "tiny-llama"

REFUSED = [
    pytest.param({"prompt": "\ud800 hi"}, "prompt", id="lone-surrogate-prompt"),
    pytest.param({"model_parameters": {"top_k": 2**64}}, "model_parameters.top_k", id="top_k-past-64-bits"),
    pytest.param({"model_parameters": {"top_k": 2**31}}, "model_parameters.top_k", id="top_k-past-int32"),
    pytest.param({"model_parameters": {"max_tokens": 2**64}}, "model_parameters.max_tokens", id="huge-max_tokens"),
    pytest.param(
        {"model_parameters": {"stop_sequences": ["\ud800"]}},
        "model_parameters.stop_sequences.0",
        id="lone-surrogate-stop",
    ),
    pytest.param({"account_id": "\udfff"}, "account_id", id="lone-surrogate-account"),
]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize(("fields", "param"), REFUSED)
def test_values_the_engine_cannot_take_are_422_naming_the_field(
    server: RunningServer, fields: dict, param: str, stream: bool
) -> None:
    body = {"model": MODEL, "prompt": "Hello", "stream": stream, **fields}
    with server.client() as http:
        # ensure_ascii: the wire carries "\ud800" escapes, as a JSON client may send them.
        response = http.post("/v4/completions", content=json.dumps(body), headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["error"]["param"] == param
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
