"""``POST /v4/chat-completions`` at the edge: shapes, streams, instructions, memory,
request templates and their sandbox, images, validation.

In process, with stand-in engines (tests/in_process.py), much of it through the
``scale-gp`` SDK as a caller uses it. The stand-in renders a conversation as
``<s><|role|>\\ncontent\\n...<|assistant|>\\n``, answers ``max_tokens`` words `` w0 w1 ...``
and counts one prompt token a word (plus BOS when special tokens are added), so what
reached the engine, and how, is visible. What the real engine answers is
tests/test_v4_chat_sdk.py's part.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
from pathlib import Path
from typing import Any

import pytest
import scale_gp
from PIL import Image as PILImage

from server.service.chat_template import TemplateRenderer
from tests.conftest import ACCOUNT, FIXTURES
from tests.in_process import InProcessServer, cached_registry, serve_in_process

MODEL = "tiny-llama"
VISION = "tiny-llava"  # tests/fixtures/vision_overlay.yaml
ROUTE = "/v4/chat-completions"
HELLO = [{"role": "user", "content": "Hello there"}]
LLAMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)


def frames(body: str) -> list[dict[str, Any]]:
    """The data of each server-sent event (all JSON: the contract has no ``[DONE]``)."""
    assert body.endswith("\n\n"), body[-200:]
    parsed = []
    for block in body.removesuffix("\n\n").split("\n\n"):
        assert block.startswith("data: ") and "\n" not in block, block
        parsed.append(json.loads(block.removeprefix("data: ")))
    return parsed


def png_data(size: int = 8) -> str:
    buffer = io.BytesIO()
    PILImage.new("RGB", (size, size), "red").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def engine_input(server: InProcessServer, model: str = MODEL) -> Any:
    return server.engines[model].prepared[-1].engine_input


def with_tokenizer_config(home: Path, name: str = MODEL) -> None:
    """The special tokens a request template is given come from the tokenizer's files; the
    stand-in's builtin directory is empty until a test writes them."""
    config = {"bos_token": "<s>", "eos_token": {"content": "</s>", "special": True}}
    (home / "builtin" / name / "tokenizer_config.json").write_text(json.dumps(config))


async def post(server: InProcessServer, body: dict[str, Any]) -> Any:
    async with server.client() as http:
        return await http.post(ROUTE, json={"model": MODEL, **body})


# ----- shapes, through the SDK ----------------------------------------------------------------


async def test_the_sdk_gets_a_chat_completion_with_usage(app_server: InProcessServer) -> None:
    async with app_server.sdk() as client:
        response = await client.chat_completions.create(
            model=MODEL,  # type: ignore[arg-type]
            messages=[{"role": "system", "content": "Be brief"}, *HELLO],  # type: ignore[list-item]
            model_parameters={"max_tokens": 3, "temperature": 0},
        )
    assert isinstance(response, scale_gp.types.ChatCompletionsResponse)
    assert response.chat_completion.message.role == "assistant"
    assert response.chat_completion.message.content == " w0 w1 w2"
    assert response.chat_completion.finish_reason == "length"
    assert response.token_usage is not None
    # The model's own template renders the conversation, its BOS included: no other added.
    prompt = "<s><|system|>\nBe brief\n<|user|>\nHello there\n<|assistant|>\n"
    assert engine_input(app_server) == prompt
    prompt_tokens = len(prompt.split())
    assert (response.token_usage.prompt, response.token_usage.completion) == (prompt_tokens, 3)
    assert response.token_usage.total == prompt_tokens + 3
    assert response.model_dump(exclude_none=True) == {
        "chat_completion": {"message": {"role": "assistant", "content": " w0 w1 w2"}, "finish_reason": "length"},
        "token_usage": {"prompt": prompt_tokens, "completion": 3, "total": prompt_tokens + 3},
    }


async def test_model_parameters_mean_what_they_mean_for_completions(app_server: InProcessServer) -> None:
    response = await post(app_server, {"messages": HELLO, "model_parameters": {"topK": 5, "top_p": 0.5}})
    assert response.status_code == 200, response.text
    sampling = app_server.engines[MODEL].prepared[-1].sampling
    # max_tokens defaults to the registry entry's default_max_tokens (100), as for /v4/completions.
    assert (sampling.max_tokens, sampling.temperature, sampling.top_k, sampling.top_p) == (100, 0.2, 5, 0.5)
    assert response.json()["token_usage"]["completion"] == 100


async def test_a_stream_sends_the_reply_in_pieces_and_usage_last(app_server: InProcessServer) -> None:
    response = await post(app_server, {"messages": HELLO, "stream": True, "model_parameters": {"max_tokens": 4}})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = frames(response.text)
    assert "".join(e["chat_completion"]["message"]["content"] for e in events) == " w0 w1 w2 w3"
    *middle, last = events
    for event in middle:
        assert event["chat_completion"]["finish_reason"] is None and event["token_usage"] is None
        assert event["chat_completion"]["message"]["role"] == "assistant"
    assert last["chat_completion"]["finish_reason"] == "length"
    assert last["token_usage"]["completion"] == 4


async def test_the_sdk_streams_chat_chunks(app_server: InProcessServer) -> None:
    async with app_server.sdk() as client:
        stream = await client.chat_completions.create(
            model=MODEL,  # type: ignore[arg-type]
            messages=HELLO,  # type: ignore[arg-type]
            model_parameters={"max_tokens": 3},
            stream=True,
        )
        chunks = [chunk.model_dump() async for chunk in stream]
    assert "".join(c["chat_completion"]["message"]["content"] for c in chunks) == " w0 w1 w2"
    assert chunks[-1]["token_usage"] == {"prompt": 4, "completion": 3, "total": 7}


async def test_a_failure_after_the_first_event_is_an_error_event(app_server: InProcessServer) -> None:
    await post(app_server, {"messages": HELLO, "model_parameters": {"max_tokens": 1}})
    app_server.engines[MODEL].fail_after = 2
    response = await post(app_server, {"messages": HELLO, "stream": True, "model_parameters": {"max_tokens": 5}})
    assert response.status_code == 200
    assert response.text.endswith("\n\n")
    last = response.text.removesuffix("\n\n").split("\n\n")[-1]
    assert last.startswith("event: error\ndata: ")
    assert json.loads(last.split("data: ", 1)[1])["error"]["code"] == 500


# ----- the conversation: instructions, roles, memory --------------------------------------------


async def test_instructions_are_the_system_prompt(app_server: InProcessServer) -> None:
    response = await post(app_server, {"messages": HELLO, "instructions": "Answer in French"})
    assert response.status_code == 200, response.text
    assert engine_input(app_server) == "<s><|system|>\nAnswer in French\n<|user|>\nHello there\n<|assistant|>\n"


async def test_instructions_and_a_system_message_are_refused_together(app_server: InProcessServer) -> None:
    messages = [{"role": "system", "content": "Be brief"}, *HELLO]
    response = await post(app_server, {"messages": messages, "instructions": "Answer in French"})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "instructions"
    assert MODEL not in app_server.engines  # refused before any model was loaded


async def test_a_message_without_a_role_is_the_users(app_server: InProcessServer) -> None:
    response = await post(app_server, {"messages": [{"content": "Hi"}]})
    assert response.status_code == 200, response.text
    assert engine_input(app_server) == "<s><|user|>\nHi\n<|assistant|>\n"


async def test_last_k_memory_keeps_the_last_messages_after_the_instructions(app_server: InProcessServer) -> None:
    messages = [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "two"},
        {"role": "user", "content": "three"},
    ]
    body = {"messages": messages, "instructions": "Sys", "memory_strategy": {"name": "last_k", "params": {"k": 2}}}
    response = await post(app_server, body)
    assert response.status_code == 200, response.text
    assert engine_input(app_server) == "<s><|system|>\nSys\n<|assistant|>\ntwo\n<|user|>\nthree\n<|assistant|>\n"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0"),
        ({"messages": [{"role": "developer", "content": "x"}]}, "messages.0"),
        ({"messages": []}, "messages"),
        (
            {"messages": [{"role": "assistant", "content": [{"text": "parts are for users"}]}]},
            "messages.0.assistant.content",
        ),
        ({"messages": [{"role": "user", "content": [{"type": "audio", "audio": "x"}]}]}, "messages.0.user.content"),
        ({"messages": [{"image_data": {"data": "AA==", "media_type": "text/html"}}]}, "messages.0.user.content"),
        ({"messages": HELLO, "memory_strategy": {"name": "summary", "params": {"k": 2}}}, "memory_strategy.name"),
        ({"messages": HELLO, "memory_strategy": {"params": {"k": 0}}}, "memory_strategy.params.k"),
        ({"messages": HELLO, "chat_template": ""}, "chat_template"),
        ({"messages": HELLO, "chat_template": "x" * 70_000}, "chat_template"),
        ({"messages": HELLO, "model_parameters": {"temperature": 1.5}}, "model_parameters.temperature"),
    ],
)
async def test_invalid_fields_are_422_naming_them(
    app_server: InProcessServer, body: dict[str, Any], param: str
) -> None:
    response = await post(app_server, body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == 422
    assert error["param"].startswith(param), error
    assert not app_server.engines


async def test_text_that_is_not_unicode_is_422(app_server: InProcessServer) -> None:
    body = '{"model": "tiny-llama", "messages": [{"role": "user", "content": "a \\ud800 b"}]}'
    async with app_server.client() as http:
        response = await http.post(ROUTE, content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"].startswith("messages.0.user.content")


async def test_an_unknown_role_says_which_roles_there_are(app_server: InProcessServer) -> None:
    response = await post(app_server, {"messages": [{"role": "tool", "content": "x"}]})
    assert "role must be one of: user, assistant, system" in response.json()["error"]["message"]


async def test_an_unknown_model_is_404(app_server: InProcessServer) -> None:
    async with app_server.client() as http:
        response = await http.post(ROUTE, json={"model": "no-such-model", "messages": HELLO})
    assert response.status_code == 404


async def test_a_key_bound_to_an_account_logs_usage_against_it(
    app_server: InProcessServer, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="server"):
        response = await post(app_server, {"messages": HELLO, "account_id": "someone-else", "unknown_field": 1})
    assert response.status_code == 200
    lines = [r.getMessage() for r in caplog.records]
    usage = [line for line in lines if line.startswith("completion chatcmpl-")]
    assert len(usage) == 1 and f"account={ACCOUNT} " in usage[0], lines
    assert any("POST /v4/chat-completions: ignored fields: 'unknown_field'" in line for line in lines)


# ----- images ----------------------------------------------------------------------------------


async def test_images_for_a_text_model_are_400_naming_the_part(app_server: InProcessServer) -> None:
    content = [{"text": "What is it?"}, {"image_url": {"url": "data:image/png;base64," + png_data()}}]
    response = await post(app_server, {"messages": [{"role": "user", "content": content}]})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "messages[0].content[1].image_url" and "does not accept images" in error["message"]
    assert MODEL not in app_server.engines


async def test_image_parts_reach_a_vision_model_through_the_image_loader(tmp_path: Path) -> None:
    url = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + png_data()}}
    inline = {"type": "image_data", "image_data": {"data": png_data(), "media_type": "image/png"}}
    content = [url, {"type": "text", "text": "Which is red?"}, inline]
    broken = {"image_data": {"data": "bm90IGFuIGltYWdl", "media_type": "image/png"}}
    registry = cached_registry(FIXTURES / "vision_overlay.yaml")
    async with serve_in_process(tmp_path, registry=registry) as server:
        async with server.client() as http:
            good = await http.post(ROUTE, json={"model": VISION, "messages": [{"role": "user", "content": content}]})
            bad = await http.post(ROUTE, json={"model": VISION, "messages": [{"role": "user", "content": [broken]}]})
            ftp = [{"image_url": {"url": "ftp://example.com/x.png"}}]
            refused = await http.post(ROUTE, json={"model": VISION, "messages": [{"role": "user", "content": ftp}]})
    assert good.status_code == 200, good.text
    prepared = server.engines[VISION].prepared[-1]
    assert prepared.engine_input == "<s><|user|>\n<image>\nWhich is red?\n<image>\n<|assistant|>\n"
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "messages[0].content[0].image_data"
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "messages[0].content[0].image_url"


async def test_a_request_template_gets_image_placeholders_in_the_content(tmp_path: Path) -> None:
    content = [{"text": "Look:"}, {"image_data": {"data": png_data(), "media_type": "image/png"}}]
    template = "{% for m in messages %}{{ m.content }}|{% endfor %}"
    dropping = "{% for m in messages %}{{ m.role }}|{% endfor %}"
    registry = cached_registry(FIXTURES / "vision_overlay.yaml")
    async with serve_in_process(tmp_path, registry=registry) as server:
        async with server.client() as http:
            body = {"model": VISION, "messages": [{"role": "user", "content": content}]}
            good = await http.post(ROUTE, json={**body, "chat_template": template})
            dropped = await http.post(ROUTE, json={**body, "chat_template": dropping})
    assert good.status_code == 200, good.text
    assert server.engines[VISION].prepared[-1].engine_input == "Look:\n<image>|"
    assert dropped.status_code == 400, dropped.text
    assert dropped.json()["error"]["param"] == "chat_template"
    assert "placeholder" in dropped.json()["error"]["message"]


# ----- request templates ---------------------------------------------------------------------


async def test_a_request_template_renders_the_prompt_with_the_tokenizers_special_tokens(tmp_path: Path) -> None:
    async with serve_in_process(tmp_path) as server:
        with_tokenizer_config(tmp_path)
        messages = [{"role": "system", "content": "Sys"}, *HELLO]
        response = await post(server, {"messages": messages, "chat_template": LLAMA_TEMPLATE + "{{ eos_token }}"})
    assert response.status_code == 200, response.text
    prompt = "<s>[system] Sys [user] Hello there [assistant]</s>"
    prepared = server.engines[MODEL].prepared[-1]
    assert prepared.engine_input == prompt
    # As rendered: the tokenizer adds no BOS of its own (the stand-in counts one if it did).
    assert prepared.prompt_tokens == len(prompt.split())
    assert response.json()["token_usage"]["prompt"] == len(prompt.split())


async def test_a_request_template_sees_instructions_and_memory_and_streams(tmp_path: Path) -> None:
    messages = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ]
    body = {
        "messages": messages,
        "instructions": "I",
        "memory_strategy": {"params": {"k": 1}},
        "chat_template": LLAMA_TEMPLATE,
        "stream": True,
        "model_parameters": {"max_tokens": 2},
    }
    async with serve_in_process(tmp_path) as server:
        with_tokenizer_config(tmp_path)
        response = await post(server, body)
    assert response.status_code == 200, response.text
    assert server.engines[MODEL].prepared[-1].engine_input == "<s>[system] I [user] c [assistant]"
    events = frames(response.text)
    assert "".join(e["chat_completion"]["message"]["content"] for e in events) == " w0 w1"
    assert events[-1]["token_usage"]["completion"] == 2


@pytest.mark.parametrize(
    ("template", "says"),
    [
        ("{{ messages.__class__ }}", "'__class__'"),
        ("{{ messages.__class__.__mro__[1].__subclasses__() }}", "'__class__'"),
        ("{{ raise_exception.__globals__ }}", "'__globals__'"),
        ("{{ cycler.__init__.__globals__.os }}", "'__init__'"),
        ("{{ messages.append(1) }}", "'append'"),
        ("{{ self._TemplateReference__context }}", "_TemplateReference__context"),
        ("{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}", "longer than 2,000,000 characters"),
        ("{{ 'x' * 100000000 }}", "longer than 1,000,000"),
        ("{{ 'x' | center(900000000) }}", "more memory"),
        ("{% for m in messages %}", "syntax error"),
        ("{{ raise_exception('system messages are not supported') }}", "system messages are not supported"),
        ("{{ 1 / 0 }}", "ZeroDivisionError"),
        ("{{ undefined_name.attribute }}", "undefined"),
        ("{{ '\\ud800' }}", "not valid Unicode"),
    ],
)
async def test_a_request_template_that_escapes_errs_or_overflows_is_400(
    app_server: InProcessServer, template: str, says: str
) -> None:
    response = await post(app_server, {"messages": HELLO, "chat_template": template})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "chat_template" and error["type"] == "invalid_request_error"
    assert says in error["message"], error["message"]
    assert "Traceback" not in error["message"]
    # Rendered before the lease: a broken template loads no model and takes no queue place.
    assert MODEL not in app_server.engines


async def test_a_template_that_never_ends_is_stopped_and_its_worker_replaced() -> None:
    renderer = TemplateRenderer(workers=1, timeout=1.0)
    forever = "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}"
    try:
        with pytest.raises(Exception) as failure:
            await renderer.render(forever, {})
        assert "took longer than 1 s" in str(failure.value)
        # The next render gets a fresh worker.
        assert await renderer.render("{{ x }}!", {"x": "ok"}) == "ok!"
    finally:
        await renderer.close()


async def test_renders_run_side_by_side_and_a_cancelled_one_frees_its_worker() -> None:
    renderer = TemplateRenderer(workers=2, timeout=10.0)
    slow = "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}"
    try:
        stuck = asyncio.ensure_future(renderer.render(slow, {}))
        assert await asyncio.wait_for(renderer.render("{{ 1 + 1 }}", {}), 30) == "2"
        stuck.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stuck
        # The stuck worker was killed, not returned to the pool: both slots serve again.
        results = await asyncio.gather(*(renderer.render("{{ n }}", {"n": n}) for n in range(4)))
        assert results == ["0", "1", "2", "3"]
    finally:
        await renderer.close()
