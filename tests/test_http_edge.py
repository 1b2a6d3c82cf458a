"""The HTTP layer's edges: auth before the body, body limits, accounts, what callers may see.

Most tests run against a real server with keys, a 4 KiB body limit and an operator file
whose weights live in local directories; none of them loads an engine. The account tests
need completions, so they use the shared server with tiny-llama loaded.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from server.api import create_app
from server.registry import load_registry
from server.settings import Settings
from tests.conftest import API_KEY, OTHER_KEY, RunningServer, start_server

MAX_BODY = 4096
OVERLAY = """\
models:
  private-ft:
    source: /srv/private/checkpoints/ft-7
  private-lora:
    base: tiny-llama
    adapter: /srv/private/adapters/lora-3
"""
GOOD = {"model": "tiny-llama", "prompt": "Hi", "model_parameters": {"temperature": 0, "max_tokens": 2}}


@pytest.fixture(scope="module")
def edge_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    directory = tmp_path_factory.mktemp("edge")
    overlay = directory / "operator.yaml"
    overlay.write_text(OVERLAY)
    running = start_server(
        directory,
        registry_files=[overlay],
        extra_env={"V4SERVE_MAX_BODY_BYTES": str(MAX_BODY)},
        wait_path="/healthz",
        ready_timeout=120,
    )
    yield running
    running.stop()


def assert_error(response: httpx.Response, status: int, error_type: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == error_type and error["code"] == status
    return error


# ----- item 2: the key is checked before one body byte is read -----------------------------


@pytest.mark.parametrize("headers", [{}, {"x-api-key": "wrong"}])
def test_no_key_with_invalid_json_is_401_not_400(edge_server: RunningServer, headers: dict) -> None:
    response = httpx.post(
        edge_server.base_url + "/v4/completions",
        content=b'{"model": "tiny-llama", ',
        headers={"content-type": "application/json", **headers},
        timeout=30,
    )
    assert_error(response, 401, "authentication_error")
    assert response.headers["www-authenticate"] == "Bearer"


def _response_to_incomplete_request(base_url: str, head: bytes, first_body: bytes) -> tuple[int, bytes]:
    """Send the head and the start of a body that never ends; return the response.

    A server that waits for the body never answers, and the read fails at the socket
    timeout: the response arriving at all proves the body was not awaited.
    """
    url = urlsplit(base_url)
    with socket.create_connection((url.hostname, url.port), timeout=60) as sock:
        sock.sendall(head + first_body)
        data = b""
        while b"\r\n\r\n" not in data:
            received = sock.recv(65536)
            assert received, f"connection closed before a response: {data!r}"
            data += received
        block, _, body = data.partition(b"\r\n\r\n")
        status_line, *header_lines = block.split(b"\r\n")
        headers = dict(line.lower().split(b": ", 1) for line in header_lines)
        while len(body) < int(headers[b"content-length"]):
            received = sock.recv(65536)
            assert received, "connection closed in the middle of the response"
            body += received
        return int(status_line.split()[1]), body


@pytest.mark.parametrize(
    "framing",
    [b"Transfer-Encoding: chunked\r\n", b"Content-Length: 1000000000\r\n"],
    ids=["chunked", "declared-length"],
)
def test_no_key_is_refused_while_the_body_is_still_coming(edge_server: RunningServer, framing: bytes) -> None:
    head = b"POST /v4/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n" + framing + b"\r\n"
    piece = b'{"model": "tiny-llama", "prompt": "' + b"a" * 1000
    first_body = b"%x\r\n%s\r\n" % (len(piece), piece) if b"chunked" in framing else piece
    status, body = _response_to_incomplete_request(edge_server.base_url, head, first_body)
    assert status == 401
    assert b"authentication_error" in body


def test_bearer_token_is_accepted_instead_of_x_api_key(edge_server: RunningServer) -> None:
    def models(headers: dict) -> httpx.Response:
        return httpx.get(edge_server.base_url + "/v4/models", headers=headers, timeout=30)

    assert models({"Authorization": f"Bearer {API_KEY}"}).status_code == 200
    assert models({"Authorization": f"bearer {OTHER_KEY}"}).status_code == 200
    assert_error(models({"Authorization": "Bearer wrong"}), 401, "authentication_error")
    assert_error(models({"Authorization": f"Basic {API_KEY}"}), 401, "authentication_error")
    # x-api-key, when sent, is the key: a valid bearer token does not rescue a wrong one.
    assert_error(models({"x-api-key": "wrong", "Authorization": f"Bearer {API_KEY}"}), 401, "authentication_error")


# ----- item 8: a chunked body over the limit is 413 ---------------------------------------


def _chunks(total: int, size: int = 1024) -> Iterator[bytes]:
    yield b'{"model": "no-such-model", "prompt": "'
    for _ in range(total // size):
        yield b"a" * size
    yield b'"}'


def test_chunked_body_over_the_limit_is_413(edge_server: RunningServer) -> None:
    with edge_server.client() as http:
        response = http.post(
            "/v4/completions", content=_chunks(4 * MAX_BODY), headers={"content-type": "application/json"}
        )
        error = assert_error(response, 413, "payload_too_large")
        assert str(MAX_BODY) in error["message"]
        # A chunked body under the limit is read and parsed as usual: it reaches the model lookup.
        small = http.post(
            "/v4/completions", content=_chunks(MAX_BODY // 2), headers={"content-type": "application/json"}
        )
        assert_error(small, 404, "model_not_found")


# ----- item 12: what callers without a key, or with one, may see --------------------------


@pytest.mark.parametrize("path", ["/docs", "/redoc", "/openapi.json"])
def test_api_docs_need_a_key_when_keys_are_set(edge_server: RunningServer, path: str) -> None:
    assert_error(httpx.get(edge_server.base_url + path, timeout=30), 401, "authentication_error")
    with edge_server.client() as http:
        assert http.get(path).status_code == 200


def test_models_show_registry_sources_never_local_paths(edge_server: RunningServer) -> None:
    with edge_server.client() as http:
        response = http.get("/v4/models")
    assert response.status_code == 200
    assert "/srv/private" not in response.text
    models = {m["id"]: m for m in response.json()["models"]}
    assert models["private-ft"]["source"] == "local:ft-7"
    assert models["private-lora"]["adapter"] == "local:lora-3"
    assert models["private-lora"]["base"] == "tiny-llama"
    # Hub repos and builtins are shown as the registry writes them.
    assert models["llama-7b"]["source"] == "huggyllama/llama-7b"
    assert models["tiny-llama"]["source"] == "builtin:tiny-llama"


def test_unhandled_error_is_a_generic_500_and_its_path_is_logged_escaped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # No request can make the real server fail unexpectedly (that would be a bug to fix),
    # so the real application gets one route that does, called in process as the server
    # calls it, with a path that holds control characters (as "%1B" and "%0A" in a URL are
    # decoded): a terminal escape or a newline in the log could disguise or forge a line.
    app = create_app(Settings(api_keys=API_KEY, home=tmp_path), load_registry())

    async def fail(anything: str) -> None:
        raise RuntimeError(f"secret detail {tmp_path}")

    app.add_api_route("/fail/{anything}", fail)
    path = "/fail/x\x1b[2K\nFORGED"
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": b"/fail/x%1B[2K%0AFORGED",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"x-api-key", API_KEY.encode())],
        "server": ("test", 80),
        "client": ("127.0.0.1", 1),
    }
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    # Starlette answers, then re-raises for the server to log; the server survives it.
    with caplog.at_level(logging.ERROR, logger="server.api.errors"), pytest.raises(RuntimeError):
        asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 500
    body = b"".join(message.get("body", b"") for message in sent[1:])
    assert json.loads(body) == {
        "error": {"message": "internal server error", "type": "internal_error", "param": None, "code": 500}
    }
    assert b"secret" not in body and str(tmp_path).encode() not in body
    messages = [record.getMessage() for record in caplog.records if record.name == "server.api.errors"]
    assert messages and all(message.isprintable() for message in messages)
    assert any("FORGED" in message for message in messages)


# ----- item 4: the key's account wins, and logged values are escaped ----------------------


def _complete(server: RunningServer, key: str, body: dict | None = None, headers: dict | None = None) -> None:
    with server.client(api_key=key) as http:
        response = http.post("/v4/completions", json={**GOOD, **(body or {})}, headers=headers or {})
        assert response.status_code == 200, response.text


def test_a_keys_own_account_wins_over_body_and_header(server: RunningServer) -> None:
    victim = f"victim-{uuid.uuid4().hex}"
    _complete(server, API_KEY, {"account_id": victim})
    _complete(server, API_KEY, headers={"x-selected-account-id": victim})
    log = server.log()
    assert victim not in log
    assert "account=acct-1 " in log


def test_a_key_without_account_may_name_one_body_first(server: RunningServer) -> None:
    body_account, header_account = f"team-{uuid.uuid4().hex}", f"hdr-{uuid.uuid4().hex}"
    _complete(server, OTHER_KEY, {"account_id": body_account}, headers={"x-selected-account-id": header_account})
    log = server.log()
    assert f"account={body_account} " in log
    assert header_account not in log
    _complete(server, OTHER_KEY, headers={"x-selected-account-id": header_account})
    assert f"account={header_account} " in server.log()


def test_an_account_id_cannot_forge_log_lines_or_fields(server: RunningServer) -> None:
    marker = uuid.uuid4().hex
    forged = f"evil\nFORGED{marker} completion cmpl-0 model=tiny-llama account=root prompt_tokens=1"
    _complete(server, OTHER_KEY, {"account_id": forged})
    _complete(server, OTHER_KEY, {"account_id": f"team{marker} prompt_tokens=999"})
    lines = server.log().splitlines()
    assert not any(line.startswith(f"FORGED{marker}") for line in lines)
    assert any(f"account='evil\\nFORGED{marker} completion" in line for line in lines)
    assert any(f"account='team{marker} prompt_tokens=999' prompt_tokens=" in line for line in lines)
