"""The HTTP layer's edges: auth before the body, body limits, accounts, what callers may see.

Everything here runs the real application in process (tests/in_process.py): no server
process, no model. Serving the same application over a socket, and from a real engine,
is the slow layer's part (tests/test_auth_and_lifecycle.py, tests/test_completions_sdk.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import scale_gp

from server.api import create_app
from server.registry import Registry, load_registry
from server.settings import Settings
from tests.conftest import API_KEY, FIXTURES, OTHER_KEY
from tests.in_process import InProcessServer, asgi_post_scope, cached_registry, serve_in_process

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
def operator_registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    """The shipped registry and an operator file whose weights live in local directories."""
    overlay = tmp_path_factory.mktemp("edge") / "operator.yaml"
    overlay.write_text(OVERLAY)
    return cached_registry(overlay)


@pytest.fixture
async def edge(tmp_path: Path, operator_registry: Registry) -> AsyncIterator[InProcessServer]:
    """Keys, a 4 KiB body limit and the operator file."""
    async with serve_in_process(tmp_path, registry=operator_registry, max_body_bytes=MAX_BODY) as running:
        yield running


def assert_error(response: httpx.Response, status: int, error_type: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["type"] == error_type and error["code"] == status
    return error


# ----- the key is checked before one body byte is read ------------------------------------


@pytest.mark.parametrize("headers", [{}, {"x-api-key": "wrong"}, {"x-api-key": ""}])
async def test_missing_or_wrong_key_is_401_json(app_server: InProcessServer, headers: dict) -> None:
    async with app_server.client(api_key=None, headers=headers) as http:
        for response in (await http.post("/v4/completions", json=GOOD), await http.get("/v4/models")):
            assert_error(response, 401, "authentication_error")
            assert response.headers["www-authenticate"] == "Bearer"
    assert not app_server.engines, "a refused request loads no model"


async def test_sdk_with_wrong_key_raises_authentication_error(app_server: InProcessServer) -> None:
    async with app_server.sdk(api_key="wrong") as client:
        with pytest.raises(scale_gp.AuthenticationError):
            await client.completions.create(model="tiny-llama", prompt="hi")


@pytest.mark.parametrize("headers", [{}, {"x-api-key": "wrong"}])
async def test_no_key_with_invalid_json_is_401_not_400(edge: InProcessServer, headers: dict) -> None:
    async with edge.client(api_key=None, headers=headers) as http:
        response = await http.post(
            "/v4/completions", content=b'{"model": "tiny-llama", ', headers={"content-type": "application/json"}
        )
    assert_error(response, 401, "authentication_error")
    assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(
    "framing",
    [(b"transfer-encoding", b"chunked"), (b"content-length", b"1000000000")],
    ids=["chunked", "declared-length"],
)
async def test_no_key_is_refused_while_the_body_is_still_coming(
    edge: InProcessServer, framing: tuple[bytes, bytes]
) -> None:
    """The application is called with a body that never arrives: it must answer without
    asking for it. (A declared length over the limit would be 413; the key comes first.)"""
    headers = [(b"host", b"test"), (b"content-type", b"application/json"), framing]
    scope = asgi_post_scope("/v4/completions", headers)
    body_read = asyncio.Event()
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        body_read.set()
        await asyncio.Event().wait()  # the rest of the body never comes
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await asyncio.wait_for(edge.app(scope, receive, send), timeout=10)
    assert not body_read.is_set()
    assert sent[0]["status"] == 401
    assert json.loads(b"".join(m.get("body", b"") for m in sent[1:]))["error"]["type"] == "authentication_error"


async def test_bearer_token_is_accepted_instead_of_x_api_key(edge: InProcessServer) -> None:
    async def models(headers: dict) -> httpx.Response:
        async with edge.client(api_key=None, headers=headers) as http:
            return await http.get("/v4/models")

    assert (await models({"Authorization": f"Bearer {API_KEY}"})).status_code == 200
    assert (await models({"Authorization": f"bearer {OTHER_KEY}"})).status_code == 200
    assert_error(await models({"Authorization": "Bearer wrong"}), 401, "authentication_error")
    assert_error(await models({"Authorization": f"Basic {API_KEY}"}), 401, "authentication_error")
    # x-api-key, when sent, is the key: a valid bearer token does not rescue a wrong one.
    assert_error(
        await models({"x-api-key": "wrong", "Authorization": f"Bearer {API_KEY}"}), 401, "authentication_error"
    )


# ----- body limits -------------------------------------------------------------------------


async def _chunks(total: int, size: int = 1024) -> AsyncIterator[bytes]:
    yield b'{"model": "no-such-model", "prompt": "'
    for _ in range(total // size):
        yield b"a" * size
    yield b'"}'


async def test_chunked_body_over_the_limit_is_413(edge: InProcessServer) -> None:
    async with edge.client() as http:
        response = await http.post(
            "/v4/completions", content=_chunks(4 * MAX_BODY), headers={"content-type": "application/json"}
        )
        assert "content-length" not in response.request.headers  # sent chunked: counted as it comes
        error = assert_error(response, 413, "payload_too_large")
        assert str(MAX_BODY) in error["message"]
        # A chunked body under the limit is read and parsed as usual: it reaches the model lookup.
        small = await http.post(
            "/v4/completions", content=_chunks(MAX_BODY // 2), headers={"content-type": "application/json"}
        )
        assert_error(small, 404, "model_not_found")


async def test_declared_length_over_the_limit_is_413(edge: InProcessServer) -> None:
    async with edge.client() as http:
        body = json.dumps({**GOOD, "prompt": "a" * MAX_BODY}).encode()
        response = await http.post("/v4/completions", content=body, headers={"content-type": "application/json"})
    error = assert_error(response, 413, "payload_too_large")
    assert str(MAX_BODY) in error["message"]


# ----- what callers without a key, or with one, may see -------------------------------------


@pytest.mark.parametrize("path", ["/docs", "/redoc", "/openapi.json"])
async def test_api_docs_need_a_key_when_keys_are_set(edge: InProcessServer, path: str) -> None:
    async with edge.client(api_key=None) as http:
        assert_error(await http.get(path), 401, "authentication_error")
    async with edge.client() as http:
        assert (await http.get(path)).status_code == 200


async def test_models_show_registry_sources_never_local_paths(edge: InProcessServer) -> None:
    async with edge.client() as http:
        response = await http.get("/v4/models")
    assert response.status_code == 200
    assert "/srv/private" not in response.text
    models = {m["id"]: m for m in response.json()["models"]}
    assert models["private-ft"]["source"] == "local:ft-7"
    assert models["private-lora"]["adapter"] == "local:lora-3"
    assert models["private-lora"]["base"] == "tiny-llama"
    # Hub repos and builtins are shown as the registry writes them.
    assert models["llama-7b"]["source"] == "huggyllama/llama-7b"
    assert models["tiny-llama"]["source"] == "builtin:tiny-llama"


async def test_models_lists_ids_aliases_sources_and_state(tmp_path: Path) -> None:
    chat = cached_registry(FIXTURES / "chat_overlay.yaml")
    async with serve_in_process(tmp_path, registry=chat, preload=["tiny-llama"]) as running:
        async with running.client() as http:
            models = {m["id"]: m for m in (await http.get("/v4/models")).json()["models"]}
    tiny = models["tiny-llama"]
    assert tiny["state"] == "ready"
    assert tiny["aliases"] == ["tiny"]
    assert tiny["source"] == "builtin:tiny-llama"
    assert tiny["engine"] == "vllm"
    assert tiny["running_requests"] == tiny["queued_requests"] == 0
    assert models["tiny-chat"]["state"] == "not_loaded"


async def test_health_and_readiness_need_no_key(tmp_path: Path) -> None:
    # The preloaded model's start is held: the server is alive but not ready until it ends.
    async with serve_in_process(tmp_path, preload=["tiny"], hold_starts=True) as running:
        async with running.client(api_key=None) as http:
            assert (await http.get("/healthz")).json() == {"status": "ok"}
            loading = await http.get("/readyz")
            assert loading.status_code == 503
            assert loading.json() == {"status": "loading", "preload": ["tiny"]}
            running.starts.set()
            await running.wait_ready()
            ready = await http.get("/readyz")
            assert ready.status_code == 200 and ready.json()["status"] == "ready"


async def test_an_open_server_serves_everything_without_a_key(tmp_path: Path) -> None:
    """No keys: every route and the API docs are open (the slow layer checks that such a
    server binds loopback only and says so). Nothing preloaded: ready at once."""
    async with serve_in_process(tmp_path, api_keys="") as running, running.client(api_key=None) as http:
        response = await http.get("/v4/models")
        assert response.status_code == 200
        assert (await http.get("/readyz")).status_code == 200
        states = {m["id"]: m["state"] for m in response.json()["models"]}
        assert states["tiny-llama"] == "not_loaded"
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert (await http.get(path)).status_code == 200
        assert (await http.post("/v4/completions", json=GOOD)).status_code == 200


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
    error = json.loads(body)["error"]
    assert error.pop("request_id") == dict(sent[0]["headers"])[b"x-request-id"].decode()
    assert error == {"message": "internal server error", "type": "internal_error", "param": None, "code": 500}
    assert b"secret" not in body and str(tmp_path).encode() not in body
    messages = [record.getMessage() for record in caplog.records if record.name == "server.api.errors"]
    assert messages and all(message.isprintable() for message in messages)
    assert any("FORGED" in message for message in messages)


# ----- the key's account wins, and logged values are escaped --------------------------------


@pytest.fixture
def usage_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """The server's log records, from INFO: each completion logs its usage there."""
    with caplog.at_level(logging.INFO, logger="server"):
        yield caplog


async def _complete(
    server: InProcessServer,
    log: pytest.LogCaptureFixture,
    key: str,
    body: dict | None = None,
    headers: dict | None = None,
) -> str:
    """One completion; the usage line the server logged for it (exactly one)."""
    log.clear()
    async with server.client(api_key=key) as http:
        response = await http.post("/v4/completions", json={**GOOD, **(body or {})}, headers=headers or {})
    assert response.status_code == 200, response.text
    [line] = [r.getMessage() for r in log.records if r.getMessage().startswith("completion cmpl-")]
    assert " model=tiny-llama " in line
    return line


async def test_every_configured_key_works_and_usage_is_attributed(
    app_server: InProcessServer, usage_log: pytest.LogCaptureFixture
) -> None:
    # "test-key:acct-1" names its account; "other-key" names none, and neither does its caller.
    assert " account=acct-1 " in await _complete(app_server, usage_log, API_KEY)
    assert " account=- " in await _complete(app_server, usage_log, OTHER_KEY)


async def test_a_keys_own_account_wins_over_body_and_header(
    app_server: InProcessServer, usage_log: pytest.LogCaptureFixture
) -> None:
    victim = f"victim-{uuid.uuid4().hex}"
    for line in (
        await _complete(app_server, usage_log, API_KEY, {"account_id": victim}),
        await _complete(app_server, usage_log, API_KEY, headers={"x-selected-account-id": victim}),
    ):
        assert victim not in line
        assert " account=acct-1 " in line


async def test_a_key_without_account_may_name_one_body_first(
    app_server: InProcessServer, usage_log: pytest.LogCaptureFixture
) -> None:
    body_account, header_account = f"team-{uuid.uuid4().hex}", f"hdr-{uuid.uuid4().hex}"
    line = await _complete(
        app_server,
        usage_log,
        OTHER_KEY,
        {"account_id": body_account},
        headers={"x-selected-account-id": header_account},
    )
    assert f" account={body_account} " in line
    assert header_account not in line
    line = await _complete(app_server, usage_log, OTHER_KEY, headers={"x-selected-account-id": header_account})
    assert f" account={header_account} " in line


async def test_an_account_id_cannot_forge_log_lines_or_fields(
    app_server: InProcessServer, usage_log: pytest.LogCaptureFixture
) -> None:
    marker = uuid.uuid4().hex
    forged = f"evil\nFORGED{marker} completion cmpl-0 model=tiny-llama account=root prompt_tokens=1"
    line = await _complete(app_server, usage_log, OTHER_KEY, {"account_id": forged})
    assert "\n" not in line
    assert f"account='evil\\nFORGED{marker} completion" in line
    line = await _complete(app_server, usage_log, OTHER_KEY, {"account_id": f"team{marker} prompt_tokens=999"})
    assert f"account='team{marker} prompt_tokens=999' prompt_tokens=" in line
