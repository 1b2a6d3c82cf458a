"""The OpenAI-compatible routes' edge: shapes, SSE framing, errors, fan-out, aborts.

In process, with stand-in engines (tests/in_process.py), partly through the ``openai`` SDK
as a caller would use it. What the real engine answers (texts, token counts,
log-probabilities against transformers) is tests/test_openai_sdk.py's and
tests/test_logprobs.py's part.

The stand-in answers ``max_tokens`` words `` w0 w1 ...``, and counts one prompt token a
word (plus BOS when special tokens are added) or one per token ID.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from PIL import Image as PILImage

from tests.conftest import API_KEY, FIXTURES
from tests.in_process import BASE_URL, InProcessServer, cached_registry, serve_in_process

MODEL = "tiny-llama"
VISION = "tiny-llava"  # tests/fixtures/vision_overlay.yaml
CHAT = [{"role": "user", "content": "Hi there"}]


def sdk(server: InProcessServer, api_key: str = API_KEY) -> openai.AsyncOpenAI:
    """The ``openai`` SDK, calling the application in process."""
    http = httpx.AsyncClient(transport=httpx.ASGITransport(server.app))
    return openai.AsyncOpenAI(api_key=api_key, base_url=f"{BASE_URL}/v1", max_retries=0, http_client=http)


def frames(body: str) -> list[Any]:
    """The data of each server-sent event: JSON objects, then the literal ``[DONE]``."""
    assert body.endswith("\n\n"), body[-200:]
    parsed: list[Any] = []
    for block in body.removesuffix("\n\n").split("\n\n"):
        assert block.startswith("data: ") and "\n" not in block, block
        data = block.removeprefix("data: ")
        parsed.append(data if data == "[DONE]" else json.loads(data))
    return parsed


def png_data_uri(size: int = 8) -> str:
    buffer = io.BytesIO()
    PILImage.new("RGB", (size, size), "red").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


# ----- shapes ------------------------------------------------------------------------------


async def test_a_completion_has_openai_shape(app_server: InProcessServer) -> None:
    async with app_server.client() as http:
        # An alias is answered by the model it names.
        response = await http.post("/v1/completions", json={"model": "tiny", "prompt": "a b c", "max_tokens": 3})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["id"].startswith("cmpl-") and isinstance(body["created"], int)
    assert body == {
        "id": body["id"],
        "object": "text_completion",
        "created": body["created"],
        "model": MODEL,
        "choices": [{"index": 0, "text": " w0 w1 w2", "logprobs": None, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7},
        "system_fingerprint": None,
    }


async def test_max_tokens_defaults_to_16_and_text_prompts_get_special_tokens(app_server: InProcessServer) -> None:
    async with sdk(app_server) as client:
        completion = await client.completions.create(model=MODEL, prompt="a b")
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (3, 16)
    prepared = app_server.engines[MODEL].prepared[-1]
    assert prepared.engine_input == "a b"
    assert prepared.sampling.temperature == 1.0  # OpenAI's default, not the hosted contract's 0.2


@pytest.mark.parametrize(
    ("prompt", "prompt_tokens"),
    [
        pytest.param(["a", "b c", "d e f"], [2, 3, 4], id="strings"),
        pytest.param([[5, 6], [7], [8, 9, 10]], [2, 1, 3], id="token-lists"),
    ],
)
async def test_a_batch_has_one_choice_per_prompt_and_n_in_index_order(
    app_server: InProcessServer, prompt: list, prompt_tokens: list[int]
) -> None:
    async with sdk(app_server) as client:
        completion = await client.completions.create(model=MODEL, prompt=prompt, n=2, max_tokens=2, seed=7)
    assert [choice.index for choice in completion.choices] == list(range(6))
    assert all(choice.text == " w0 w1" for choice in completion.choices)
    assert completion.usage is not None
    # Each prompt counted once, however many choices it has.
    assert completion.usage.prompt_tokens == sum(prompt_tokens)
    assert completion.usage.completion_tokens == 12
    prepared = app_server.engines[MODEL].prepared[-3:]
    assert [p.prompt_tokens for p in prepared] == prompt_tokens
    if isinstance(prompt[0], list):
        assert [list(p.engine_input) for p in prepared] == prompt


async def test_a_token_id_list_is_one_prompt(app_server: InProcessServer) -> None:
    async with sdk(app_server) as client:
        completion = await client.completions.create(model=MODEL, prompt=[4, 5, 6], max_tokens=1)
    assert len(completion.choices) == 1
    assert completion.usage is not None and completion.usage.prompt_tokens == 3


async def test_echo_with_max_tokens_0_returns_the_prompt_alone(app_server: InProcessServer) -> None:
    async with sdk(app_server) as client:
        text = await client.completions.create(model=MODEL, prompt="a b", max_tokens=0, echo=True)
        tokens = await client.completions.create(model=MODEL, prompt=[3, 4], max_tokens=0, echo=True)
        both = await client.completions.create(model=MODEL, prompt="a b", max_tokens=2, echo=True)
    assert text.choices[0].text == "a b"
    assert text.choices[0].finish_reason == "length"
    assert text.usage is not None and text.usage.completion_tokens == 0
    assert tokens.choices[0].text == " w3 w4"  # token IDs echo as the tokenizer decodes them
    assert both.choices[0].text == "a b w0 w1"


async def test_a_chat_completion_has_openai_shape(app_server: InProcessServer) -> None:
    async with app_server.client() as http:
        response = await http.post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT, "max_tokens": 2})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert body["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": " w0 w1"}, "logprobs": None, "finish_reason": "length"}
    ]
    # The conversation went through the model's chat template, without another BOS.
    prepared = app_server.engines[MODEL].prepared[-1]
    assert prepared.engine_input == "<s><|user|>\nHi there\n<|assistant|>\n"
    assert body["usage"]["prompt_tokens"] == prepared.prompt_tokens


async def test_chat_without_max_tokens_may_fill_the_context(app_server: InProcessServer) -> None:
    async with app_server.client() as http:
        response = await http.post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT})
    assert response.status_code == 200
    prepared = app_server.engines[MODEL].prepared[-1]
    assert prepared.sampling.max_tokens == 2048 - prepared.prompt_tokens


async def test_an_explicit_max_tokens_beyond_the_context_is_cut_to_it(app_server: InProcessServer) -> None:
    """As vLLM's OpenAI server does (the hosted contract refuses it instead)."""
    async with app_server.client() as http:
        response = await http.post("/v1/completions", json={"model": MODEL, "prompt": "a", "max_tokens": 10**6})
    assert response.status_code == 200
    assert app_server.engines[MODEL].prepared[-1].sampling.max_tokens == 2048 - 2


async def test_parameters_reach_the_engine(app_server: InProcessServer) -> None:
    body = {
        "model": MODEL,
        "prompt": "a",
        "max_tokens": 2,
        "temperature": 1.5,
        "top_p": 0.5,
        "top_k": 3,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
        "stop": "x",
        "seed": 11,
        "logit_bias": {"7": -100, "9": 2.5},
        "logprobs": 2,
        "echo": True,
        "user": "someone",
        # vLLM's extensions, as `vllm bench serve` sends them.
        "ignore_eos": True,
        "repetition_penalty": 1.0,
    }
    async with app_server.client() as http:
        response = await http.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    sampling = app_server.engines[MODEL].prepared[-1].sampling
    assert sampling.temperature == 1.5 and sampling.top_p == 0.5 and sampling.top_k == 3
    assert (sampling.presence_penalty, sampling.frequency_penalty) == (0.5, -0.5)
    assert sampling.stop == ("x",) and sampling.seed == 11
    assert sampling.logit_bias == ((7, -100.0), (9, 2.5))
    assert sampling.ignore_eos is True
    # Echo with logprobs asks for the prompt's too, with as many alternatives.
    assert (sampling.logprobs, sampling.prompt_logprobs) == (2, 2)


# ----- streaming ----------------------------------------------------------------------------


async def test_completion_stream_frames_and_usage(app_server: InProcessServer) -> None:
    body = {"model": MODEL, "prompt": ["a", "b c"], "n": 2, "max_tokens": 3, "stream": True}
    async with app_server.client() as http:
        plain = await http.post("/v1/completions", json=body)
        with_usage = await http.post("/v1/completions", json={**body, "stream_options": {"include_usage": True}})
    assert plain.headers["content-type"].startswith("text/event-stream")
    chunks = frames(plain.text)
    assert chunks[-1] == "[DONE]" and all(isinstance(c, dict) for c in chunks[:-1])
    assert all("usage" not in chunk for chunk in chunks[:-1])
    texts: dict[int, str] = {}
    finished: dict[int, str] = {}
    for chunk in chunks[:-1]:
        assert chunk["object"] == "text_completion" and chunk["model"] == MODEL
        (choice,) = chunk["choices"]
        index = choice["index"]
        assert index not in finished  # nothing of a choice after its finish
        texts[index] = texts.get(index, "") + choice["text"]
        if choice["finish_reason"] is not None:
            finished[index] = choice["finish_reason"]
    assert texts == dict.fromkeys(range(4), " w0 w1 w2")
    assert finished == dict.fromkeys(range(4), "length")
    *_, usage, done = frames(with_usage.text)
    assert done == "[DONE]"
    assert usage["choices"] == []
    assert usage["usage"] == {"prompt_tokens": 5, "completion_tokens": 12, "total_tokens": 17}


async def test_chat_stream_sends_the_role_first_then_text_then_the_finish(app_server: InProcessServer) -> None:
    body = {
        "model": MODEL,
        "messages": CHAT,
        "max_tokens": 2,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with app_server.client() as http:
        response = await http.post("/v1/chat/completions", json=body)
    chunks = frames(response.text)
    assert chunks[-1] == "[DONE]"
    deltas = [chunk["choices"][0] for chunk in chunks[:-2]]
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks[:-1])
    assert deltas[0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(d["delta"].get("content", "") for d in deltas) == " w0 w1"
    assert [d["finish_reason"] for d in deltas] == [None] * (len(deltas) - 1) + ["length"]
    assert chunks[-2]["choices"] == [] and chunks[-2]["usage"]["completion_tokens"] == 2


async def test_the_sdk_reads_streams_of_both_routes(app_server: InProcessServer) -> None:
    async with sdk(app_server) as client:
        stream = await client.completions.create(model=MODEL, prompt="a", max_tokens=4, stream=True)
        text = "".join([chunk.choices[0].text async for chunk in stream])
        chat = await client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, stream=True)
        content = "".join([chunk.choices[0].delta.content or "" async for chunk in chat])
    assert text == content == " w0 w1 w2 w3"


async def test_a_failure_after_the_first_event_is_an_error_frame_then_done(app_server: InProcessServer) -> None:
    async with app_server.client() as http:
        await http.post("/v1/completions", json={"model": MODEL, "prompt": "a", "max_tokens": 1})  # loads it
        engine = app_server.engines[MODEL]
        engine.fail_after = 2
        response = await http.post("/v1/completions", json={"model": MODEL, "prompt": "a", "stream": True})
    assert response.status_code == 200
    *served, failure, done = frames(response.text)
    assert [chunk["choices"][0]["text"] for chunk in served] == [" w0", " w1"]
    assert failure == {
        "error": {
            "message": "the stand-in engine failed",
            "type": "engine_error",
            "param": None,
            "code": 500,
            "request_id": response.headers["x-request-id"],
        }
    }
    assert done == "[DONE]"
    assert len(engine.aborted) == 1 and not engine.running
    # The SDK raises it.
    async with sdk(app_server) as client:
        stream = await client.completions.create(model=MODEL, prompt="a", stream=True)
        with pytest.raises(openai.APIError, match="the stand-in engine failed"):
            async for _ in stream:
                pass


async def test_one_failing_choice_ends_and_aborts_them_all(app_server: InProcessServer) -> None:
    async with app_server.client() as http:
        await http.post("/v1/completions", json={"model": MODEL, "prompt": "a", "max_tokens": 1})
        engine = app_server.engines[MODEL]
        engine.fail_after = 3
        response = await http.post("/v1/completions", json={"model": MODEL, "prompt": ["a", "b"], "n": 2})
    assert response.status_code == 500
    assert response.json()["error"]["type"] == "engine_error"
    assert not engine.running


# ----- errors -------------------------------------------------------------------------------

COMPLETION = {"model": MODEL, "prompt": "a"}
CHAT_BODY = {"model": MODEL, "messages": CHAT}


@pytest.mark.parametrize(
    ("route", "body", "param", "says"),
    [
        ("/v1/completions", {**COMPLETION, "frobnicate": 1}, "frobnicate", "unknown field"),
        ("/v1/completions", {**COMPLETION, "suffix": "x"}, "suffix", "unsupported field(s): suffix"),
        ("/v1/completions", {**COMPLETION, "best_of": 3}, "best_of", "unsupported field(s): best_of"),
        ("/v1/completions", {**COMPLETION, "repetition_penalty": 1.2}, "repetition_penalty", "unsupported"),
        ("/v1/completions", {**COMPLETION, "repetition_penalty": 0}, "repetition_penalty", "greater than 0"),
        ("/v1/completions", {**COMPLETION, "ignore_eos": "sometimes"}, "ignore_eos", "boolean"),
        ("/v1/chat/completions", {**CHAT_BODY, "tools": [{"type": "function"}]}, "tools", "unsupported"),
        ("/v1/chat/completions", {**CHAT_BODY, "response_format": {"type": "json_object"}}, "response_format", ""),
        ("/v1/completions", {**COMPLETION, "temperature": 2.5}, "temperature", "less than or equal to 2"),
        ("/v1/completions", {**COMPLETION, "top_p": 0}, "top_p", "greater than 0"),
        ("/v1/completions", {**COMPLETION, "n": 0}, "n", "greater than or equal to 1"),
        ("/v1/completions", {**COMPLETION, "prompt": []}, "prompt", "not empty"),
        ("/v1/completions", {**COMPLETION, "prompt": [1, "a"]}, "prompt", "token IDs are integers"),
        ("/v1/completions", {**COMPLETION, "prompt": [[1], [-2]]}, "prompt", "prompt 1 must be"),
        ("/v1/completions", {**COMPLETION, "prompt": "\ud800"}, "prompt", "unpaired surrogate"),
        ("/v1/completions", {**COMPLETION, "stop": ""}, "stop", "must not be empty"),
        ("/v1/completions", {**COMPLETION, "stop": [1]}, "stop", "a string or a list of strings"),
        ("/v1/completions", {**COMPLETION, "logit_bias": {"x": 1}}, "logit_bias", "keys must be token IDs"),
        ("/v1/completions", {**COMPLETION, "logit_bias": {"1": 101}}, "logit_bias.1", "less than or equal to 100"),
        ("/v1/completions", {**COMPLETION, "logprobs": -1}, "logprobs", "greater than or equal to 0"),
        ("/v1/completions", {**COMPLETION, "max_tokens": 0}, "max_tokens", "only with echo"),
        ("/v1/completions", {**COMPLETION, "n": 2, "temperature": 0}, "n", "greedy"),
        ("/v1/completions", {**COMPLETION, "stream_options": {"include_usage": True}}, "stream_options", "stream"),
        ("/v1/chat/completions", {**CHAT_BODY, "top_logprobs": 2}, "top_logprobs", "logprobs set to true"),
        ("/v1/chat/completions", {**CHAT_BODY, "top_logprobs": 21, "logprobs": True}, "top_logprobs", "20"),
        ("/v1/chat/completions", {**CHAT_BODY, "messages": []}, "messages", "at least 1"),
        ("/v1/chat/completions", {**CHAT_BODY, "messages": [{"role": "tool", "content": "x"}]}, "messages.0", "tag"),
        ("/v1/chat/completions", {**CHAT_BODY, "echo": True}, "echo", "unknown field"),
        ("/v1/chat/completions", {**CHAT_BODY, "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
    ],
)
async def test_invalid_requests_are_400_naming_the_field(
    app_server: InProcessServer, route: str, body: dict, param: str, says: str
) -> None:
    async with app_server.client() as http:
        response = await http.post(route, content=json.dumps(body), headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert says in error["message"]
    assert error["code"] == 400
    assert set(error) == {"message", "type", "param", "code", "request_id"}


async def test_malformed_json_is_400(app_server: InProcessServer) -> None:
    async with app_server.client() as http:
        response = await http.post("/v1/completions", content=b"{", headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_json"


async def test_the_sdk_raises_openais_errors(app_server: InProcessServer) -> None:
    async with sdk(app_server) as client:
        with pytest.raises(openai.BadRequestError) as bad:
            await client.completions.create(model=MODEL, prompt="a", extra_body={"frobnicate": 1})
        with pytest.raises(openai.NotFoundError) as missing:
            await client.completions.create(model="no-such-model", prompt="a")
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model="no-such-model", messages=CHAT)
    assert bad.value.status_code == 400
    assert missing.value.body == {
        "message": missing.value.body["message"],
        "type": "model_not_found",
        "param": "model",
        "code": 404,
        "request_id": missing.value.response.headers["x-request-id"],
    }
    assert "'no-such-model' is not in the registry" in missing.value.body["message"]
    async with sdk(app_server, api_key="wrong") as client:
        with pytest.raises(openai.AuthenticationError):
            await client.models.list()


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/v1/models"])
async def test_a_request_without_a_key_is_401(app_server: InProcessServer, path: str) -> None:
    async with app_server.client(api_key=None) as http:
        response = await (http.get(path) if path == "/v1/models" else http.post(path, json=COMPLETION))
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"
    # The OpenAI SDK's way of sending the key is accepted.
    async with app_server.client(api_key=None, headers={"authorization": f"Bearer {API_KEY}"}) as http:
        assert (await http.get("/v1/models")).status_code == 200


# ----- models -------------------------------------------------------------------------------


async def test_models_lists_every_registered_id_and_alias(app_server: InProcessServer) -> None:
    async with app_server.client() as http:
        listed = (await http.get("/v1/models")).json()
        registered = (await http.get("/v4/models")).json()["models"]
    assert listed["object"] == "list"
    assert all(set(card) == {"id", "object", "created", "owned_by"} for card in listed["data"])
    assert all(card["object"] == "model" and card["owned_by"] == "v4serve" for card in listed["data"])
    names = [card["id"] for card in listed["data"]]
    expected = [name for model in registered for name in (model["id"], *model["aliases"])]
    assert names == expected
    assert names[:2] == [MODEL, "tiny"]
    async with sdk(app_server) as client:
        assert [model.id async for model in client.models.list()] == names


# ----- images in chat -----------------------------------------------------------------------


async def test_image_parts_for_a_text_model_are_400_naming_the_part(app_server: InProcessServer) -> None:
    content = [{"type": "text", "text": "What is it?"}, {"type": "image_url", "image_url": {"url": png_data_uri()}}]
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}]}
    async with app_server.client() as http:
        response = await http.post("/v1/chat/completions", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "messages[0].content[1].image_url"
    assert "does not accept images" in error["message"]
    assert MODEL not in app_server.engines  # refused before the model was loaded


async def test_image_parts_reach_a_vision_model_as_placeholders(tmp_path: Path) -> None:
    content = [{"type": "image_url", "image_url": {"url": png_data_uri()}}, {"type": "text", "text": "What is it?"}]
    body = {"model": VISION, "messages": [{"role": "user", "content": content}], "max_tokens": 1}
    bare = [{"type": "image_url", "image_url": "ftp://x"}]  # a bare URL string, as vLLM also takes it
    async with serve_in_process(tmp_path, registry=cached_registry(FIXTURES / "vision_overlay.yaml")) as server:
        async with server.client() as http:
            response = await http.post("/v1/chat/completions", json=body)
            bad = await http.post(
                "/v1/chat/completions", json={**body, "messages": [{"role": "user", "content": bare}]}
            )
    assert response.status_code == 200, response.text
    # The stand-in's template renders a list of parts as text, without placeholders: the
    # image becomes a placeholder in the message's text, where the part was.
    assert server.engines[VISION].prepared[-1].engine_input == "<s><|user|>\n<image>\nWhat is it?\n<|assistant|>\n"
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "messages[0].content[0].image_url"
