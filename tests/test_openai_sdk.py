"""The OpenAI-compatible routes through the ``openai`` SDK, against the real server and vLLM.

The session's server (tests/conftest.py: tiny-llama preloaded, tiny-chat on demand) serves
``/v1`` beside ``/v4``, through one service path: the same greedy prompt answers alike on
both, token counts are the tokenizer's, and choices, seeds, echo and streams behave as
vLLM's OpenAI server makes them behave. Shapes and errors in detail are
tests/test_openai_edge.py's part; log-probabilities against transformers are
tests/test_logprobs.py's.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import API_KEY, TEST_HOME, RunningServer

pytestmark = pytest.mark.slow

MODEL = "tiny-llama"
PROMPT = "The quick brown fox"
MESSAGES: list[Any] = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(api_key=API_KEY, base_url=f"{server.base_url}/v1", max_retries=0, timeout=600)


@pytest.fixture(scope="module")
def tokenizer(server: RunningServer) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TEST_HOME / "builtin" / MODEL)


def greedy_text(client: openai.OpenAI, prompt: Any, max_tokens: int = 16, **kwargs: Any) -> str:
    completion = client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0, **kwargs)
    return completion.choices[0].text


def test_a_completion_counts_tokens_as_the_tokenizer_does(client: openai.OpenAI, tokenizer: Any) -> None:
    completion = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    (choice,) = completion.choices
    assert choice.text and choice.finish_reason in {"stop", "length"}
    assert completion.model == MODEL and completion.object == "text_completion"
    usage = completion.usage
    assert usage is not None
    assert usage.prompt_tokens == len(tokenizer(PROMPT).input_ids)  # BOS included, as the engine sees it
    assert 1 <= usage.completion_tokens <= 12
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_v1_and_v4_take_one_path_to_the_same_answer(client: openai.OpenAI, server: RunningServer) -> None:
    with server.client() as http:
        v4 = http.post(
            "/v4/completions",
            json={"model": MODEL, "prompt": PROMPT, "model_parameters": {"temperature": 0, "max_tokens": 20}},
        ).json()
    v1 = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, temperature=0)
    assert v1.choices[0].text == v4["completion"]["text"]
    assert v1.usage is not None
    assert (v1.usage.prompt_tokens, v1.usage.completion_tokens) == (
        v4["token_usage"]["prompt"],
        v4["token_usage"]["completion"],
    )


def test_a_stream_equals_the_whole_answer_and_ends_with_usage(client: openai.OpenAI) -> None:
    whole = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0)
    stream = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    *parts, last = chunks
    assert len(parts) > 1
    assert "".join(chunk.choices[0].text for chunk in parts) == whole.choices[0].text
    assert parts[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert last.choices == [] and last.usage == whole.usage


def test_the_async_client_serves_concurrent_requests(server: RunningServer) -> None:
    async def run() -> list[str]:
        client = openai.AsyncOpenAI(api_key=API_KEY, base_url=f"{server.base_url}/v1", max_retries=0, timeout=600)
        async with client:
            completions = await asyncio.gather(
                *(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0) for _ in range(6))
            )
            chat = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5, temperature=0)
        assert chat.choices[0].message.role == "assistant"
        return [completion.choices[0].text for completion in completions]

    texts = asyncio.run(run())
    assert len(set(texts)) == 1 and texts[0]


def test_token_id_prompts_answer_as_their_text(client: openai.OpenAI, tokenizer: Any) -> None:
    ids = tokenizer(PROMPT).input_ids  # with BOS, as a text prompt is tokenized
    by_text = greedy_text(client, PROMPT)
    assert greedy_text(client, ids) == by_text
    batch = client.completions.create(model=MODEL, prompt=[ids, ids[:3]], max_tokens=16, temperature=0)
    assert [choice.index for choice in batch.choices] == [0, 1]
    assert batch.choices[0].text == by_text
    assert batch.choices[1].text == greedy_text(client, ids[:3])
    assert batch.usage is not None and batch.usage.prompt_tokens == len(ids) + 3


def test_a_batch_of_text_prompts_answers_each(client: openai.OpenAI) -> None:
    prompts = [PROMPT, "Once upon a time", "Hello"]
    batch = client.completions.create(model=MODEL, prompt=prompts, max_tokens=10, temperature=0)
    assert [choice.text for choice in batch.choices] == [greedy_text(client, p, 10) for p in prompts]


def test_echo_with_max_tokens_0_returns_the_prompt_and_its_logprobs(client: openai.OpenAI, tokenizer: Any) -> None:
    ids = tokenizer(PROMPT).input_ids
    completion = client.completions.create(model=MODEL, prompt=ids, max_tokens=0, echo=True, logprobs=2)
    (choice,) = completion.choices
    assert choice.text == tokenizer.decode(ids)  # token IDs echo as vLLM decodes them
    logprobs = choice.logprobs
    assert logprobs is not None and logprobs.token_logprobs is not None and logprobs.top_logprobs is not None
    assert len(logprobs.token_logprobs) == len(ids)
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None  # nothing predicts the first
    assert all(isinstance(value, float) and value <= 0 for value in logprobs.token_logprobs[1:])
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (len(ids), 0)
    # Text echoes as sent; the answer follows the prompt.
    echoed = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, echo=True)
    assert echoed.choices[0].text == PROMPT + greedy_text(client, PROMPT, 8)


def test_logprobs_have_openais_shape(client: openai.OpenAI) -> None:
    completion = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3)
    logprobs = completion.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens is not None
    assert logprobs.text_offset is not None and logprobs.token_logprobs is not None
    assert logprobs.top_logprobs is not None
    assert completion.usage is not None
    count = completion.usage.completion_tokens
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == count
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(count)]
    for token, value, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, strict=True):
        assert top is not None and 1 <= len(top) <= 4  # the chosen token and the 3 likeliest
        assert top[token] == value  # greedy: the chosen token is among them
        assert value == max(top.values())
    chat = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
    )
    content = chat.choices[0].logprobs
    assert content is not None and content.content is not None
    assert chat.usage is not None and len(content.content) == chat.usage.completion_tokens
    for entry in content.content:
        assert len(entry.top_logprobs) == 3
        assert entry.bytes == list(entry.token.encode("utf-8"))
        assert entry.logprob == entry.top_logprobs[0].logprob  # greedy: the likeliest
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)


def test_n_choices_with_a_seed_are_the_seeded_requests_seed_plus_index(client: openai.OpenAI) -> None:
    """As vLLM's parallel sampling: choice ``i`` samples with ``seed + i``."""
    kwargs: dict[str, Any] = {"model": MODEL, "prompt": PROMPT, "max_tokens": 12, "temperature": 1.0}
    together = client.completions.create(n=3, seed=1234, **kwargs)
    assert [choice.index for choice in together.choices] == [0, 1, 2]
    alone = [client.completions.create(seed=1234 + i, **kwargs).choices[0].text for i in range(3)]
    assert [choice.text for choice in together.choices] == alone
    assert len(set(alone)) > 1  # different seeds sample differently
    again = client.completions.create(n=3, seed=1234, **kwargs)
    assert [choice.text for choice in again.choices] == alone
    assert together.usage is not None and 3 <= together.usage.completion_tokens <= 36


def test_stop_sequences_end_the_text_before_them(client: openai.OpenAI) -> None:
    text = greedy_text(client, PROMPT, 40)
    stop = text[5:8]
    assert stop and stop not in text[:5]
    completion = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=40, temperature=0, stop=[stop])
    assert completion.choices[0].text == text[: text.index(stop)]
    assert completion.choices[0].finish_reason == "stop"


def test_chat_renders_the_template_and_counts_its_tokens(client: openai.OpenAI, tokenizer: Any) -> None:
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0)
    rendered = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert chat.usage is not None
    assert chat.usage.prompt_tokens == len(tokenizer(rendered, add_special_tokens=False).input_ids)
    # The same conversation as a raw prompt of its rendered text answers alike.
    assert chat.choices[0].message.content == greedy_text(
        client, tokenizer(rendered, add_special_tokens=False).input_ids, 12
    )
    stream = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content
    assert chunks[-1].usage == chat.usage


def test_a_chat_entry_of_v4_and_chat_completions_agree(client: openai.OpenAI, server: RunningServer) -> None:
    """tiny-chat (prompt_format: chat) wraps a /v4 prompt as one user message in the same
    template: the same conversation through /v1/chat/completions answers alike."""
    with server.client() as http:
        v4 = http.post(
            "/v4/completions",
            json={"model": "tiny-chat", "prompt": "Hello", "model_parameters": {"temperature": 0, "max_tokens": 10}},
        ).json()
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=10, temperature=0
    )
    assert chat.choices[0].message.content == v4["completion"]["text"]
    assert chat.usage is not None and chat.usage.prompt_tokens == v4["token_usage"]["prompt"]


def test_errors_are_openais(client: openai.OpenAI, server: RunningServer) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model=MODEL, prompt=PROMPT, extra_body={"best_of": 2})
    assert bad.value.body == {
        "message": "unsupported field(s): best_of; this server does not implement it",
        "type": "invalid_request_error",
        "param": "best_of",
        "code": 400,
        "request_id": bad.value.response.headers["x-request-id"],
    }
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=MESSAGES, extra_body={"frobnicate": True})
    with pytest.raises(openai.BadRequestError, match="returns at most 20 log-probabilities"):
        client.completions.create(model=MODEL, prompt=PROMPT, logprobs=21, stream=True)
    with pytest.raises(openai.BadRequestError, match="out of vocabulary"):
        client.completions.create(model=MODEL, prompt=[10**6], stream=True)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt=PROMPT)
    wrong = openai.OpenAI(api_key="wrong-key", base_url=f"{server.base_url}/v1", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.completions.create(model=MODEL, prompt=PROMPT)
    with server.client(api_key=None) as http:
        response = http.post("/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES})
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"
    assert server.running_requests(MODEL) == 0


def test_models_lists_the_registry(client: openai.OpenAI) -> None:
    names = [model.id for model in client.models.list()]
    assert names[:2] == [MODEL, "tiny"]
    assert "tiny-chat" in names


def test_a_client_leaving_a_stream_aborts_every_choice(server: RunningServer) -> None:
    """Four engine requests (two prompts, n=2) far too long to finish while the client
    reads one event; leaving aborts them all (the model of tests/test_disconnect.py)."""
    long_model, max_tokens = "tiny-llama-long", 20_000
    # EOS (token 1) banned: every choice would run its 20,000 tokens.
    body = {
        "model": long_model,
        "prompt": [PROMPT, "Hello"],
        "n": 2,
        "max_tokens": max_tokens,
        "logit_bias": {"1": -100},
        "stream": True,
    }
    with httpx.Client(base_url=server.base_url, headers={"x-api-key": API_KEY}, timeout=300) as http:
        with http.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            # The iterator stays referenced: dropping it would close the stream at once.
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data: {"))
        # Leaving the block closes the connection mid-stream.
    assert server.wait_for_running(long_model, lambda running: running == 0, 10) < 10
    aborted = re.findall(rf"model={long_model} .* completion_tokens=(\d+) aborted: the client went away", server.log())
    assert aborted and int(aborted[-1]) < 4 * max_tokens
