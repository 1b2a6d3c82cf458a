"""Contract tests of ``POST /v4/chat-completions``: the ``scale-gp`` SDK against the real
server and vLLM engine.

The session's server (tests/conftest.py) serves ``tiny-chat``, the tiny Llama prompted
through its chat template (tests/fixtures/chat_overlay.yaml), and ``tiny-llama``, prompted
raw. A chat request takes the path of a completion: the same conversation answers the
same greedy text with the same token counts on ``/v4/completions``, ``/v4/chat-completions``
and ``/v1/chat/completions``. Shapes, validation and the template sandbox in detail are
tests/test_v4_chat.py's part.
"""

from __future__ import annotations

from typing import Any

import pytest
import scale_gp
from scale_gp import SGPClient

from server.weights.tiny import CHAT_TEMPLATE
from tests.conftest import API_KEY, TEST_HOME, RunningServer

pytestmark = pytest.mark.slow

CHAT_MODEL = "tiny-chat"
RAW_MODEL = "tiny-llama"
GREEDY = {"temperature": 0.0, "max_tokens": 16}
HELLO = [{"role": "user", "content": "The quick brown fox"}]


@pytest.fixture(scope="module")
def client(server: RunningServer) -> SGPClient:
    return SGPClient(api_key=API_KEY, base_url=server.base_url, max_retries=0, timeout=600)


@pytest.fixture(scope="module")
def tokenizer(server: RunningServer) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TEST_HOME / "builtin" / RAW_MODEL)


def chat(client: SGPClient, **kwargs: Any) -> Any:
    return client.chat_completions.create(**{"model": CHAT_MODEL, "model_parameters": GREEDY, **kwargs})


def test_a_reply_is_the_completion_of_the_same_prompt(client: SGPClient, tokenizer: Any) -> None:
    # tiny-chat's /v4/completions wraps the prompt as one user message in the model's template.
    completion = client.completions.create(model=CHAT_MODEL, prompt=HELLO[0]["content"], model_parameters=GREEDY)
    reply = chat(client, messages=HELLO)
    assert isinstance(reply, scale_gp.types.ChatCompletionsResponse)
    assert reply.chat_completion.message.role == "assistant"
    assert reply.chat_completion.message.content == completion.completion.text
    assert reply.chat_completion.message.content
    assert reply.chat_completion.finish_reason == completion.completion.finish_reason
    assert reply.token_usage is not None and completion.token_usage is not None
    assert reply.token_usage.model_dump() == completion.token_usage.model_dump()
    # The template's own BOS and nothing more: the tokenizer's count of the rendered text.
    rendered = tokenizer.apply_chat_template(HELLO, tokenize=False, add_generation_prompt=True)
    assert reply.token_usage.prompt == len(tokenizer(rendered, add_special_tokens=False).input_ids)


def test_v4_and_v1_chat_take_one_path(client: SGPClient, server: RunningServer) -> None:
    messages = [{"role": "system", "content": "Answer briefly."}, *HELLO]
    reply = chat(client, messages=messages)
    with server.client() as http:
        v1 = http.post(
            "/v1/chat/completions", json={"model": CHAT_MODEL, "messages": messages, "temperature": 0, "max_tokens": 16}
        ).json()
    assert v1["choices"][0]["message"]["content"] == reply.chat_completion.message.content
    assert v1["usage"]["prompt_tokens"] == reply.token_usage.prompt
    assert v1["usage"]["completion_tokens"] == reply.token_usage.completion


def test_a_stream_adds_up_to_the_reply(client: SGPClient) -> None:
    whole = chat(client, messages=HELLO)
    chunks = [chunk.model_dump() for chunk in chat(client, messages=HELLO, stream=True)]
    assert len(chunks) > 1
    assert "".join(c["chat_completion"]["message"]["content"] for c in chunks) == whole.chat_completion.message.content
    assert all(c["token_usage"] is None for c in chunks[:-1])
    assert chunks[-1]["chat_completion"]["finish_reason"] == whole.chat_completion.finish_reason
    assert chunks[-1]["token_usage"] == whole.token_usage.model_dump()


def test_instructions_are_a_system_message(client: SGPClient) -> None:
    system = {"role": "system", "content": "Answer briefly."}
    with_message = chat(client, messages=[system, *HELLO])
    with_instructions = chat(client, messages=HELLO, instructions="Answer briefly.")
    assert with_instructions.model_dump() == with_message.model_dump()


def test_last_k_memory_answers_as_the_last_messages_alone(client: SGPClient) -> None:
    history = [{"role": "user", "content": "Once upon a time"}, {"role": "assistant", "content": "there was"}]
    remembered = chat(client, messages=[*history, *HELLO], memory_strategy={"name": "last_k", "params": {"k": 1}})
    assert remembered.model_dump() == chat(client, messages=HELLO).model_dump()


def test_the_models_own_template_sent_with_the_request_answers_alike(client: SGPClient) -> None:
    # Rendered in the sandbox with the tokenizer's bos_token, sent without another BOS.
    assert (
        chat(client, messages=HELLO, chat_template=CHAT_TEMPLATE).model_dump()
        == chat(client, messages=HELLO).model_dump()
    )


def test_a_request_template_can_prompt_a_raw_model_as_a_completion(client: SGPClient) -> None:
    template = "{{ bos_token }}{{ messages[-1]['content'] }}"
    reply = chat(client, model=RAW_MODEL, messages=HELLO, chat_template=template)
    completion = client.completions.create(model=RAW_MODEL, prompt=HELLO[0]["content"], model_parameters=GREEDY)
    assert reply.chat_completion.message.content == completion.completion.text
    assert reply.token_usage.model_dump() == completion.token_usage.model_dump()


def test_a_template_reaching_for_python_internals_is_refused(client: SGPClient) -> None:
    template = "{{ messages.__class__.__mro__[1].__subclasses__() }}{{ raise_exception.__globals__ }}"
    with pytest.raises(scale_gp.BadRequestError) as refused:
        chat(client, messages=HELLO, chat_template=template)
    assert refused.value.status_code == 400
    error = refused.value.body["error"]  # type: ignore[index]
    assert error["param"] == "chat_template" and "'__class__'" in error["message"]


def test_an_unknown_role_is_refused(client: SGPClient) -> None:
    with pytest.raises(scale_gp.UnprocessableEntityError) as refused:
        chat(client, messages=[{"role": "tool", "content": "42"}])
    assert refused.value.body["error"]["param"] == "messages.0"  # type: ignore[index]
