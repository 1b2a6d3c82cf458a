"""Bad input gets a clear JSON error with the right status, and the server keeps serving.

In process (tests/in_process.py): these errors are decided before any model runs. The
errors a real engine decides (a prompt past its context) are tested against it in
tests/test_engine_rejections.py.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import scale_gp

from tests.in_process import InProcessServer, serve_in_process

GOOD = {"model": "tiny-llama", "prompt": "Hello", "model_parameters": {"temperature": 0, "max_tokens": 3}}
MODEL = "tiny-llama"


def with_params(**params) -> dict:
    return {**GOOD, "model_parameters": {**GOOD["model_parameters"], **params}}


def assert_error(response: httpx.Response, status: int, *, param: str | None = None, says: str = "") -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    # The request's ID too (docs/operations.md#request-ids), as its response header says.
    assert set(error) == {"message", "type", "param", "code", "request_id"}
    assert error["request_id"] == response.headers["x-request-id"]
    assert error["code"] == status
    assert error["message"]
    assert "Traceback" not in error["message"]
    if param is not None:
        assert error["param"] == param
    assert says.lower() in error["message"].lower()
    return error


@pytest.fixture
async def serving(app_server: InProcessServer) -> AsyncIterator[InProcessServer]:
    """After every bad request, a good one still succeeds."""
    yield app_server
    async with app_server.client() as http:
        response = await http.post("/v4/completions", json=GOOD)
        assert response.status_code == 200, response.text
        assert response.json()["token_usage"]["completion"] >= 1


@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        (with_params(temperature=1.5), "model_parameters.temperature", "less than or equal to 1"),
        (with_params(temperature=-0.1), "model_parameters.temperature", "greater than or equal to 0"),
        (with_params(stop_sequences=["a", "b", "c", "d", "e"]), "model_parameters.stop_sequences", "at most 4"),
        (with_params(stop_sequences=[""]), "model_parameters.stop_sequences", "empty"),
        (with_params(max_tokens=0), "model_parameters.max_tokens", "greater than or equal to 1"),
        (with_params(max_tokens="many"), "model_parameters.max_tokens", "integer"),
        (with_params(temperature="hot"), "model_parameters.temperature", "number"),
        (with_params(top_p=0), "model_parameters.top_p", "greater than 0"),
        (with_params(top_k=-5), "model_parameters.top_k", "greater than or equal to -1"),
        (with_params(presence_penalty=3), "model_parameters.presence_penalty", "less than or equal to 2"),
        ({"model": "tiny-llama"}, "prompt", "field required"),
        ({"prompt": "hi"}, "model", "field required"),
        ({**GOOD, "prompt": 42}, "prompt", "string"),
        ({**GOOD, "stream": "sometimes"}, "stream", "boolean"),
        ({**GOOD, "images": "not-a-list"}, "images", "list"),
    ],
)
async def test_invalid_parameters_name_the_field(serving: InProcessServer, body: dict, param: str, says: str) -> None:
    async with serving.client() as http:
        error = assert_error(await http.post("/v4/completions", json=body), 422, param=param, says=says)
    assert error["type"] == "invalid_parameter"


# Values vLLM would refuse only after the request was registered with it (a lone surrogate
# fails its tokenizer or msgpack encoder, an integer past 64 bits its encoder): refused at
# the door, naming the field, before the engine sees them. That a failure after the
# hand-over is aborted in the real engine is tests/test_engine_rejections.py's part.
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
async def test_values_the_engine_cannot_take_are_422_naming_the_field(
    tmp_path: Path, fields: dict, param: str, stream: bool
) -> None:
    # The model is loaded first, so "the engine never saw it" is a fact, not a missing engine.
    async with serve_in_process(tmp_path, preload=[MODEL]) as running, running.client() as http:
        body = {"model": MODEL, "prompt": "Hello", "stream": stream, **fields}
        # ensure_ascii: the wire carries "\ud800" escapes, as a JSON client may send them.
        response = await http.post(
            "/v4/completions", content=json.dumps(body), headers={"content-type": "application/json"}
        )
        assert_error(response, 422, param=param)
        assert running.engines[MODEL].prepared == []
        models = {m["id"]: m for m in (await http.get("/v4/models")).json()["models"]}
        assert models[MODEL]["running_requests"] == 0
        assert (await http.post("/v4/completions", json=GOOD)).status_code == 200


async def test_largest_accepted_values_pass_the_door(serving: InProcessServer) -> None:
    body = with_params(temperature=1, top_k=2**31 - 1)
    async with serving.client() as http:
        response = await http.post("/v4/completions", json=body)
    assert response.status_code == 200, response.text
    assert serving.engines[MODEL].prepared[-1].sampling.top_k == 2**31 - 1


async def test_malformed_json_is_400(serving: InProcessServer) -> None:
    async with serving.client() as http:
        response = await http.post(
            "/v4/completions", content=b'{"model": "tiny-llama", ', headers={"content-type": "application/json"}
        )
    error = assert_error(response, 400, param="body", says="not valid JSON")
    assert error["type"] == "invalid_json"


async def test_unknown_model_is_404_naming_it_and_how_to_list(serving: InProcessServer) -> None:
    async with serving.client() as http:
        response = await http.post("/v4/completions", json={**GOOD, "model": "no-such-model"})
    error = assert_error(response, 404, param="model")
    assert error["type"] == "model_not_found"
    assert "no-such-model" in error["message"]
    assert "/v4/models" in error["message"]


async def test_unknown_model_through_sdk_raises_not_found(serving: InProcessServer) -> None:
    async with serving.sdk() as client:
        with pytest.raises(scale_gp.NotFoundError):
            await client.completions.create(model="no-such-model", prompt="hi")
        with pytest.raises(scale_gp.UnprocessableEntityError):
            await client.completions.create(model="tiny-llama", prompt="hi", model_parameters={"temperature": 2})


async def test_images_for_a_text_model_are_400(serving: InProcessServer) -> None:
    async with serving.sdk() as client:
        with pytest.raises(scale_gp.BadRequestError) as caught:
            await client.completions.create(
                model="tiny-llama", prompt="What is this?", images=[{"image_url": "data:image/png;base64,AAAA"}]
            )
    body = caught.value.body
    assert isinstance(body, dict)
    assert body["error"]["param"] == "images"
    assert MODEL not in serving.engines, "a refused image costs no model load"


async def test_an_engine_refusal_before_the_first_token_is_400_even_streaming(serving: InProcessServer) -> None:
    """What the engine refuses in ``prepare`` (here a prompt past the stand-in's context)
    is answered with its status, for a streaming request too: the stream has not begun."""
    async with serving.client() as http:
        for stream in (False, True):
            body = {**GOOD, "prompt": "hello " * 3000, "stream": stream}
            assert_error(await http.post("/v4/completions", json=body), 400, param="prompt", says="2048")


async def test_oversized_body_is_413(serving: InProcessServer) -> None:
    async with serving.client() as http:
        # Above the default 32 MiB body limit: refused from Content-Length, unread.
        big = b'{"model": "tiny-llama", "prompt": "' + b"a" * (33 << 20) + b'"}'
        response = await http.post("/v4/completions", content=big, headers={"content-type": "application/json"})
    error = assert_error(response, 413, says="larger than")
    assert error["type"] == "payload_too_large"


@pytest.mark.parametrize(("method", "path"), [("GET", "/v4/nothing-here"), ("POST", "/v5/completions")])
async def test_unknown_route_is_json_404(serving: InProcessServer, method: str, path: str) -> None:
    async with serving.client() as http:
        error = assert_error(await http.request(method, path), 404)
    assert error["type"] == "http_error"


async def test_wrong_method_is_json_405(serving: InProcessServer) -> None:
    async with serving.client() as http:
        error = assert_error(await http.get("/v4/completions"), 405)
    assert error["type"] == "http_error"
