"""The shapes of ``POST /v4/completions``: response JSON, SSE framing, wire aliases.

In process, with stand-in engines (tests/in_process.py), through the public ``scale-gp``
SDK where a caller would use it. What the real engine answers (texts, token counts, stop
sequences, streaming equal to non-streaming) is tests/test_completions_sdk.py's part.
"""

from __future__ import annotations

import json

from tests.in_process import InProcessServer

MODEL = "tiny-llama"
PROMPT = "The quick brown fox"
BODY = {"model": MODEL, "prompt": PROMPT, "model_parameters": {"temperature": 0, "max_tokens": 5}}


def events(body: str) -> list[tuple[str | None, dict]]:
    """The ``(event name, data)`` of each server-sent event; every data is one JSON object."""
    parsed = []
    assert body.endswith("\n\n"), body[-100:]
    for block in body.removesuffix("\n\n").split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        assert set(fields) <= {"event", "data"}, block
        parsed.append((fields.get("event"), json.loads(fields["data"])))
    return parsed


async def test_a_completion_is_text_finish_reason_and_usage(app_server: InProcessServer) -> None:
    async with app_server.client() as http:
        response = await http.post("/v4/completions", json=BODY)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body == {
        "completion": {"text": " w0 w1 w2 w3 w4", "finish_reason": "length", "response_metadata": None},
        "token_usage": {"prompt": 5, "completion": 5, "total": 10},
    }
    # The SDK reads the same.
    async with app_server.sdk() as client:
        parsed = await client.completions.create(model=MODEL, prompt=PROMPT, model_parameters=BODY["model_parameters"])
    assert parsed.completion.text == body["completion"]["text"]
    assert parsed.token_usage is not None and parsed.token_usage.total == 10


async def test_stream_is_server_sent_events_ending_with_the_body(app_server: InProcessServer) -> None:
    async with app_server.client() as http:
        whole = (await http.post("/v4/completions", json=BODY)).json()
        response = await http.post("/v4/completions", json={**BODY, "stream": True})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    # Only "data:" events, each a CompletionResponse; no "[DONE]": the SDK parses every
    # data line as JSON, and the stream ends with the body.
    assert "[DONE]" not in response.text
    streamed = events(response.text)
    assert all(name is None for name, _ in streamed)
    assert "".join(data["completion"]["text"] for _, data in streamed) == whole["completion"]["text"]
    assert streamed[-1][1]["token_usage"] == whole["token_usage"]


async def test_stream_events_carry_usage_only_at_the_end(app_server: InProcessServer) -> None:
    async with app_server.sdk() as client:
        stream = await client.completions.create(
            model=MODEL, prompt=PROMPT, model_parameters={"temperature": 0, "max_tokens": 15}, stream=True
        )
        chunks = [chunk.model_dump() async for chunk in stream]
    *middle, last = chunks
    assert middle
    assert all(c["token_usage"] is None and c["completion"]["finish_reason"] is None for c in middle)
    assert last["completion"]["finish_reason"] == "length"
    usage = last["token_usage"]
    assert usage["prompt"] + usage["completion"] == usage["total"]
    assert usage["completion"] == 15


async def test_a_failure_after_the_first_event_is_an_error_event(app_server: InProcessServer) -> None:
    """The status is sent with the first event; a later failure can only be an event, and
    the request is taken out of the engine."""
    async with app_server.client() as http:
        await http.post("/v4/completions", json=BODY)  # loads the model
        engine = app_server.engines[MODEL]
        engine.fail_after = 2
        response = await http.post("/v4/completions", json={**BODY, "stream": True})
    assert response.status_code == 200
    *served, (name, failure) = events(response.text)
    assert [data["completion"]["text"] for _, data in served] == [" w0", " w1"]
    assert name == "error"
    assert failure == {
        "error": {
            "message": "the stand-in engine failed",
            "type": "engine_error",
            "param": None,
            "code": 500,
            "request_id": response.headers["x-request-id"],
        }
    }
    assert len(engine.aborted) == 1 and not engine.running


async def test_wire_aliases_topK_and_topP_reach_the_engine(app_server: InProcessServer) -> None:
    body = {**BODY, "model_parameters": {"temperature": 1.0, "topK": 1, "topP": 0.5, "max_tokens": 2}}
    async with app_server.client() as http:
        assert (await http.post("/v4/completions", json=body)).status_code == 200
    sampling = app_server.engines[MODEL].prepared[-1].sampling
    assert (sampling.top_k, sampling.top_p, sampling.temperature) == (1, 0.5, 1.0)
