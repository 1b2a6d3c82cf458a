"""Request IDs: taken from ``x-request-id`` when valid, else made; on every response, in
error bodies, in log lines, and as the engine's request ID. In process (tests/in_process.py)."""

from __future__ import annotations

import json
import logging
import re

import pytest

from server.telemetry import request_ids
from server.telemetry.logs import JsonFormatter, RequestIdFilter, TextFormatter
from tests.in_process import InProcessServer

GOOD = {"model": "tiny-llama", "prompt": "one two", "model_parameters": {"max_tokens": 2}}
GENERATED = re.compile(r"[0-9a-f]{32}")


async def test_a_valid_incoming_id_is_returned_and_used_by_the_engine(app_server: InProcessServer) -> None:
    async with app_server.client(headers={"x-request-id": "trace-42.a:b"}) as http:
        v4 = await http.post("/v4/completions", json=GOOD)
        v1 = await http.post("/v1/completions", json={"model": "tiny-llama", "prompt": "one", "max_tokens": 1})
    assert v4.headers["x-request-id"] == "trace-42.a:b"
    assert v1.headers["x-request-id"] == "trace-42.a:b"
    # The engine request (whose ID is the OpenAI response's `id`) carries it, with a
    # suffix: two requests sent with the same ID must not abort each other in the engine.
    assert re.fullmatch(r"cmpl-trace-42\.a:b-[0-9a-f]{8}", v1.json()["id"])


async def test_without_an_id_one_is_made_and_names_the_engine_request(app_server: InProcessServer) -> None:
    async with app_server.client() as http:
        first = await http.post("/v1/completions", json={"model": "tiny-llama", "prompt": "one", "max_tokens": 1})
        second = await http.post("/v1/completions", json={"model": "tiny-llama", "prompt": "one", "max_tokens": 1})
    ids = [response.headers["x-request-id"] for response in (first, second)]
    assert all(GENERATED.fullmatch(request_id) for request_id in ids) and ids[0] != ids[1]
    assert first.json()["id"] == f"cmpl-{ids[0]}"


@pytest.mark.parametrize(
    "presented", ["x" * (request_ids.MAX_LENGTH + 1), "has space", "new\\nline", 'quote"d', "", "ünï"]
)
async def test_an_invalid_incoming_id_is_replaced(app_server: InProcessServer, presented: str) -> None:
    async with app_server.client() as http:
        response = await http.post("/v4/completions", json=GOOD, headers={"x-request-id": presented.encode("utf-8")})
    assert response.status_code == 200
    assert GENERATED.fullmatch(response.headers["x-request-id"])


async def test_errors_carry_the_id_in_header_and_body(app_server: InProcessServer) -> None:
    headers = {"x-request-id": "err-1"}
    async with app_server.client(api_key=None, headers=headers) as anonymous:
        unauthorized = await anonymous.post("/v4/completions", json=GOOD)
    async with app_server.client(headers=headers) as http:
        unknown = await http.post("/v4/completions", json={**GOOD, "model": "nope"})
        invalid = await http.post("/v4/completions", json={**GOOD, "model_parameters": {"max_tokens": "x"}})
        not_json = await http.post("/v1/completions", content=b"{", headers={"content-type": "application/json"})
        missing = await http.get("/no/such/route")
    for response, status in ((unauthorized, 401), (unknown, 404), (invalid, 422), (not_json, 400), (missing, 404)):
        assert response.status_code == status
        assert response.headers["x-request-id"] == "err-1"
        assert response.json()["error"]["request_id"] == "err-1", response.text


async def test_streams_and_probes_carry_the_id(app_server: InProcessServer) -> None:
    async with app_server.client(headers={"x-request-id": "s-1"}) as http:
        stream = await http.post("/v4/completions", json={**GOOD, "stream": True})
        probe = await http.get("/healthz")
    assert stream.headers["content-type"].startswith("text/event-stream")
    assert stream.headers["x-request-id"] == "s-1" and probe.headers["x-request-id"] == "s-1"


async def test_log_lines_about_the_request_carry_its_id(
    app_server: InProcessServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.handler.addFilter(RequestIdFilter())
    with caplog.at_level(logging.INFO, logger="server"):
        async with app_server.client(headers={"x-request-id": "log-7"}) as http:
            await http.post("/v4/completions", json={**GOOD, "unknown_field": 1})
    lines = [record for record in caplog.records if record.name.startswith("server.")]
    usage = [record for record in lines if record.getMessage().startswith("completion ")]
    ignored = [record for record in lines if "ignored fields" in record.getMessage()]
    assert usage and ignored
    assert all(getattr(record, "request_id", None) == "log-7" for record in usage + ignored)


def test_json_and_text_formats_name_the_request() -> None:
    record = logging.LogRecord("server.x", logging.INFO, __file__, 1, "hello %s", ("world",), None)
    token = request_ids.bind(request_ids.RequestId("rid-9", supplied=True))
    try:
        RequestIdFilter().filter(record)
    finally:
        request_ids.unbind(token)
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "hello world" and line["request_id"] == "rid-9"
    assert line["level"] == "INFO" and line["logger"] == "server.x"
    assert TextFormatter().format(record).endswith("hello world request_id=rid-9")
    outside = logging.LogRecord("server.x", logging.INFO, __file__, 1, "idle", (), None)
    RequestIdFilter().filter(outside)
    assert "request_id" not in json.loads(JsonFormatter().format(outside))
