"""Contract tests: the public ``scale-gp`` SDK against the real server and vLLM engine.

The response and stream shapes themselves are tested in process, in
tests/test_completions_shapes.py.
"""

from __future__ import annotations

import asyncio
import re

import pytest
from scale_gp import AsyncSGPClient, SGPClient

from tests.conftest import API_KEY, TEST_HOME, RunningServer

pytestmark = pytest.mark.slow

PROMPT = "The quick brown fox"
GREEDY = {"temperature": 0.0}


@pytest.fixture(scope="module")
def client(server: RunningServer) -> SGPClient:
    return SGPClient(api_key=API_KEY, base_url=server.base_url, max_retries=0, timeout=600)


def stream_text(client: SGPClient, **kwargs) -> tuple[str, list[dict]]:
    chunks = [c.model_dump() for c in client.completions.create(stream=True, **kwargs)]
    return "".join(c["completion"]["text"] for c in chunks), chunks


@pytest.fixture(scope="module")
def tokenizer(server: RunningServer):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TEST_HOME / "builtin" / "tiny-llama")


def test_completion_returns_text_finish_reason_and_usage(client: SGPClient, tokenizer) -> None:
    response = client.completions.create(
        model="tiny-llama", prompt=PROMPT, model_parameters={**GREEDY, "max_tokens": 12}
    )
    assert response.completion.text
    assert response.completion.finish_reason in {"stop", "length"}
    usage = response.token_usage
    assert usage is not None
    assert usage.prompt == len(tokenizer(PROMPT).input_ids)  # BOS included, as the engine sees it
    assert 1 <= usage.completion <= 12
    assert usage.prompt + usage.completion == usage.total


def test_max_tokens_is_respected(client: SGPClient) -> None:
    response = client.completions.create(
        model="tiny-llama", prompt="Once upon a time", model_parameters={**GREEDY, "max_tokens": 7}
    )
    assert response.token_usage.completion <= 7
    if response.completion.finish_reason == "length":
        assert response.token_usage.completion == 7


def test_default_max_tokens_is_the_registry_default(client: SGPClient) -> None:
    response = client.completions.create(model="tiny-llama", prompt=PROMPT, model_parameters=GREEDY)
    # The registry's default_max_tokens for tiny-llama is 100, as the hosted API applies.
    assert response.token_usage.completion <= 100
    if response.completion.finish_reason == "length":
        assert response.token_usage.completion == 100


def test_alias_serves_the_same_model(client: SGPClient) -> None:
    params = {**GREEDY, "max_tokens": 10}
    by_id = client.completions.create(model="tiny-llama", prompt=PROMPT, model_parameters=params)
    by_alias = client.completions.create(model="tiny", prompt=PROMPT, model_parameters=params)
    assert by_alias.completion.text == by_id.completion.text


def test_greedy_is_deterministic_and_streaming_matches(client: SGPClient) -> None:
    params = {**GREEDY, "max_tokens": 40}
    first = client.completions.create(model="tiny-llama", prompt=PROMPT, model_parameters=params)
    second = client.completions.create(model="tiny-llama", prompt=PROMPT, model_parameters=params)
    assert first.completion.text == second.completion.text
    streamed, chunks = stream_text(client, model="tiny-llama", prompt=PROMPT, model_parameters=params)
    assert streamed == first.completion.text
    assert len(chunks) > 1


def test_streamed_usage_is_the_engines_count_as_without_streaming(client: SGPClient) -> None:
    params = {**GREEDY, "max_tokens": 15}
    whole = client.completions.create(model="tiny-llama", prompt=PROMPT, model_parameters=params)
    _, chunks = stream_text(client, model="tiny-llama", prompt=PROMPT, model_parameters=params)
    last = chunks[-1]
    assert last["completion"]["finish_reason"] == whole.completion.finish_reason
    assert last["token_usage"] == whole.token_usage.model_dump()
    assert last["token_usage"]["completion"] <= 15


def _stop_from(text: str) -> str:
    """A stop sequence taken from the middle of a greedy output: printable ASCII only."""
    for start in range(3, len(text) - 3):
        candidate = text[start : start + 3]
        if re.fullmatch(r"[A-Za-z0-9 ]{3}", candidate) and candidate.strip():
            return candidate
    pytest.fail(f"no usable stop sequence in {text!r}")


def test_stop_sequence_is_excluded_in_both_modes(client: SGPClient) -> None:
    params = {**GREEDY, "max_tokens": 60}
    full = client.completions.create(model="tiny-llama", prompt=PROMPT, model_parameters=params).completion.text
    stop = _stop_from(full)
    expected = full[: full.index(stop)]
    with_stop = {**params, "stop_sequences": [stop, "never-seen-xyz"]}

    response = client.completions.create(model="tiny-llama", prompt=PROMPT, model_parameters=with_stop)
    assert response.completion.text == expected
    assert stop not in response.completion.text
    assert response.completion.finish_reason == "stop"

    streamed, chunks = stream_text(client, model="tiny-llama", prompt=PROMPT, model_parameters=with_stop)
    assert streamed == expected
    assert chunks[-1]["completion"]["finish_reason"] == "stop"


def test_sampling_parameters_are_accepted(client: SGPClient) -> None:
    response = client.completions.create(
        model="tiny-llama",
        prompt=PROMPT,
        model_parameters={
            "temperature": 0.9,
            "max_tokens": 8,
            "top_k": 20,
            "top_p": 0.9,
            "presence_penalty": 0.5,
            "frequency_penalty": 0.5,
        },
    )
    assert response.token_usage.completion <= 8


def test_top_k_one_is_greedy(client: SGPClient) -> None:
    # With top_k=1 only the most likely token can be sampled, whatever the temperature:
    # proof that top_k reaches the engine.
    greedy = client.completions.create(model="tiny-llama", prompt=PROMPT, model_parameters={**GREEDY, "max_tokens": 20})
    top1 = client.completions.create(
        model="tiny-llama", prompt=PROMPT, model_parameters={"temperature": 1.0, "top_k": 1, "max_tokens": 20}
    )
    assert top1.completion.text == greedy.completion.text


def test_chat_prompt_format_uses_the_chat_template(client: SGPClient, tokenizer) -> None:
    raw = client.completions.create(model="tiny-llama", prompt="hi", model_parameters={**GREEDY, "max_tokens": 5})
    chat = client.completions.create(model="tiny-chat", prompt="hi", model_parameters={**GREEDY, "max_tokens": 5})
    # "<s><|user|>\nhi\n<|assistant|>\n" is longer than "<s>hi", and the template's BOS is
    # not doubled by the tokenizer.
    assert chat.token_usage.prompt > raw.token_usage.prompt
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat.token_usage.prompt == len(tokenizer(rendered, add_special_tokens=False).input_ids)


async def test_async_client_and_concurrent_requests(server: RunningServer) -> None:
    async with AsyncSGPClient(api_key=API_KEY, base_url=server.base_url, max_retries=0, timeout=600) as client:
        params = {**GREEDY, "max_tokens": 16}
        results = await asyncio.gather(
            *(client.completions.create(model="tiny-llama", prompt=PROMPT, model_parameters=params) for _ in range(8))
        )
        assert len({r.completion.text for r in results}) == 1

        stream = await client.completions.create(
            model="tiny-llama", prompt=PROMPT, model_parameters=params, stream=True
        )
        pieces = [chunk.model_dump()["completion"]["text"] async for chunk in stream]
        assert "".join(pieces) == results[0].completion.text
