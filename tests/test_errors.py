"""Bad input gets a clear JSON error with the right status, and the server keeps serving."""

from __future__ import annotations

import pytest
from scale_gp import BadRequestError, NotFoundError, SGPClient, UnprocessableEntityError

from tests.conftest import API_KEY, RunningServer

GOOD = {"model": "tiny-llama", "prompt": "Hello", "model_parameters": {"temperature": 0, "max_tokens": 3}}


def with_params(**params) -> dict:
    return {**GOOD, "model_parameters": {**GOOD["model_parameters"], **params}}


def assert_error(response, status: int, *, param: str | None = None, says: str = "") -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == status
    assert error["message"]
    assert "Traceback" not in error["message"]
    if param is not None:
        assert error["param"] == param
    assert says.lower() in error["message"].lower()
    return error


@pytest.fixture(autouse=True)
def still_serving(server: RunningServer):
    """After every bad request, a good one still succeeds."""
    yield
    with server.client() as http:
        response = http.post("/v4/completions", json=GOOD)
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
def test_invalid_parameters_name_the_field(server: RunningServer, body: dict, param: str, says: str) -> None:
    with server.client() as http:
        assert_error(http.post("/v4/completions", json=body), 422, param=param, says=says)


def test_malformed_json_is_400(server: RunningServer) -> None:
    with server.client() as http:
        response = http.post(
            "/v4/completions", content=b'{"model": "tiny-llama", ', headers={"content-type": "application/json"}
        )
        assert_error(response, 400, param="body", says="not valid JSON")


def test_unknown_model_is_404_naming_it_and_how_to_list(server: RunningServer) -> None:
    with server.client() as http:
        error = assert_error(http.post("/v4/completions", json={**GOOD, "model": "no-such-model"}), 404, param="model")
        assert "no-such-model" in error["message"]
        assert "/v4/models" in error["message"]


def test_unknown_model_through_sdk_raises_not_found(server: RunningServer) -> None:
    client = SGPClient(api_key=API_KEY, base_url=server.base_url, max_retries=0)
    with pytest.raises(NotFoundError):
        client.completions.create(model="no-such-model", prompt="hi")
    with pytest.raises(UnprocessableEntityError):
        client.completions.create(model="tiny-llama", prompt="hi", model_parameters={"temperature": 2})


def test_prompt_longer_than_context_is_400_naming_both_lengths(server: RunningServer) -> None:
    with server.client() as http:
        body = {**GOOD, "prompt": "hello " * 3000}
        error = assert_error(http.post("/v4/completions", json=body), 400, says="2048")
        assert "maximum context length" in error["message"]
        # Streaming requests are refused the same way, before the stream starts.
        assert_error(http.post("/v4/completions", json={**body, "stream": True}), 400, says="2048")


def test_explicit_max_tokens_beyond_context_is_400(server: RunningServer) -> None:
    with server.client() as http:
        error = assert_error(
            http.post("/v4/completions", json=with_params(max_tokens=5000)),
            400,
            param="model_parameters.max_tokens",
            says="exceeds the context length",
        )
        assert "5000" in error["message"] and "2048" in error["message"]


def test_images_for_a_text_model_are_400(server: RunningServer) -> None:
    client = SGPClient(api_key=API_KEY, base_url=server.base_url, max_retries=0)
    with pytest.raises(BadRequestError) as caught:
        client.completions.create(
            model="tiny-llama", prompt="What is this?", images=[{"image_url": "data:image/png;base64,AAAA"}]
        )
    assert caught.value.body["error"]["param"] == "images"


def test_oversized_body_is_413(server: RunningServer) -> None:
    with server.client() as http:
        # Above the default 32 MiB body limit: refused from Content-Length, unread.
        big = b'{"model": "tiny-llama", "prompt": "' + b"a" * (33 << 20) + b'"}'
        assert_error(
            http.post("/v4/completions", content=big, headers={"content-type": "application/json"}),
            413,
            says="larger than",
        )


def test_unknown_route_is_json_404(server: RunningServer) -> None:
    with server.client() as http:
        assert_error(http.get("/v4/nothing-here"), 404)
