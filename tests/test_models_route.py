"""The routes' typed edges, in process: the model list's JSON, the OpenAPI schema, the
log line for ignored fields, the probes, and engines injected through ``create_app``.

The real application runs through ``httpx.ASGITransport`` with its lifespan; the only
stand-in is the engine, started through ``create_app(..., starters=...)``, so no test
here loads a model.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from server.api import create_app
from server.api.routes import MAX_LOGGED_FIELDS, public_source
from server.api.state import AppState, state_of
from server.engines.base import AdapterRef, GenerationDelta, LaunchOptions, PreparedRequest
from server.pool import ModelState, ModelStatus
from server.protocol.v4 import ModelInfo
from server.registry import ModelEntry, Registry, load_registry
from server.settings import Settings
from tests.test_pool_gpu_paths import StandInGpuEngine

KEY = "route-test-key"
ROUTES_LOGGER = "server.api.routes"
# A model whose weights are a local directory, so the list must hide its path.
OVERLAY = """\
models:
  stand-in:
    source: {weights}
    memory: 1GiB
"""


class OkEngine(StandInGpuEngine):
    """Answers every prompt with "ok" in one step."""

    async def prepare(self, prompt: str, sampling: Any, **kwargs: Any) -> PreparedRequest:
        return PreparedRequest(prompt_tokens=len(prompt.split()), sampling=sampling, engine_input=prompt)

    async def generate(self, request: PreparedRequest, request_id: str, *, stream: bool = True):
        yield GenerationDelta("ok", request.prompt_tokens, 1, "stop")


class Starter:
    """The engine starter handed to ``create_app``; ``release`` lets held starts finish."""

    def __init__(self, *, hold: bool = False) -> None:
        self.started: list[str] = []
        self.release = asyncio.Event()
        if not hold:
            self.release.set()

    async def __call__(
        self, model_id: str, entry: ModelEntry, weights: str, adapters: Sequence[AdapterRef], launch: LaunchOptions
    ) -> OkEngine:
        await self.release.wait()
        self.started.append(model_id)
        return OkEngine(model_id, launch)


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    weights = tmp_path / "private" / "checkpoints" / "ft-7"
    weights.mkdir(parents=True)
    overlay = tmp_path / "operator.yaml"
    overlay.write_text(OVERLAY.format(weights=weights))
    return load_registry([overlay])


@pytest.fixture(autouse=True)
def _no_server_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # Settings read V4SERVE_* variables: only what a test passes counts.
    for name in os.environ:
        if name.startswith("V4SERVE_"):
            monkeypatch.delenv(name)


@contextlib.asynccontextmanager
async def running(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://testserver", headers={"x-api-key": KEY}
        ) as http:
            yield http


def make_app(tmp_path: Path, registry: Registry, starter: Starter, **settings: Any) -> FastAPI:
    config = Settings(api_keys=KEY, home=tmp_path, **settings)
    return create_app(config, registry, starters={"vllm": starter, "transformers": starter})


def served_before(status: ModelStatus) -> dict[str, Any]:
    """An entry of ``GET /v4/models`` exactly as the route built it by hand before
    ``ModelInfo``: the reference the typed route must still match, key order included."""
    return {
        "id": status.model_id,
        "aliases": list(status.aliases),
        "source": public_source(status.source),
        "base": status.base,
        "adapter": public_source(status.adapter),
        "engine": status.engine,
        "state": status.state.value,
        "running_requests": status.running,
        "queued_requests": status.queued,
        "pinned": status.pinned,
        "memory_bytes": status.memory,
        "devices": status.devices,
        "idle_seconds": status.idle_seconds,
        "load_seconds": status.load_seconds,
        "error": status.error,
    }


# ----- GET /v4/models ------------------------------------------------------------------


async def test_the_model_list_is_the_json_it_always_was(tmp_path: Path, registry: Registry) -> None:
    app = make_app(tmp_path, registry, Starter())
    async with running(app) as http:
        response = await http.get("/v4/models")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    served = response.json()
    expected = [served_before(status) for status in state_of(app).pool.status()]
    assert served == {"models": expected}
    assert all(list(model) == list(reference) for model, reference in zip(served["models"], expected, strict=True))
    # The schema documents exactly what is served.
    assert list(ModelInfo.model_fields) == list(expected[0])
    models = {model["id"]: model for model in served["models"]}
    assert models["stand-in"]["source"] == "local:ft-7"
    assert str(tmp_path) not in response.text


async def test_a_model_served_by_an_injected_engine_is_listed_as_ready(tmp_path: Path, registry: Registry) -> None:
    starter = Starter()
    app = make_app(tmp_path, registry, starter)
    async with running(app) as http:
        response = await http.post("/v4/completions", json={"model": "stand-in", "prompt": "one two"})
        assert response.status_code == 200, response.text
        assert response.json()["completion"] == {"text": "ok", "finish_reason": "stop", "response_metadata": None}
        models = {model["id"]: model for model in (await http.get("/v4/models")).json()["models"]}
    assert starter.started == ["stand-in"]  # the injected starter, not a real engine
    listed = models["stand-in"]
    assert (listed["state"], listed["running_requests"], listed["memory_bytes"]) == ("ready", 0, 1 << 30)
    assert isinstance(listed["load_seconds"], float) and isinstance(listed["idle_seconds"], float)
    assert {model["state"] for model in models.values()} <= {state.value for state in ModelState}


async def test_the_model_list_needs_a_key(tmp_path: Path, registry: Registry) -> None:
    app = make_app(tmp_path, registry, Starter())
    async with running(app) as http:
        response = await http.get("/v4/models", headers={"x-api-key": "wrong"})
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"


# ----- the OpenAPI schema --------------------------------------------------------------


def test_the_schema_declares_every_error_body_and_the_event_stream(tmp_path: Path, registry: Registry) -> None:
    spec = make_app(tmp_path, registry, Starter()).openapi()

    def model(response: dict[str, Any], media_type: str = "application/json") -> str:
        """The title of the model a response's body refers to. A component's name may be
        qualified by its module where another API family has a type of the same name."""
        ref = response["content"][media_type]["schema"]["$ref"]
        return spec["components"]["schemas"][ref.removeprefix("#/components/schemas/")]["title"]

    completions = spec["paths"]["/v4/completions"]["post"]["responses"]
    assert set(completions) == {"200", "400", "401", "404", "413", "422", "429", "500", "503"}
    assert set(completions["200"]["content"]) == {"application/json", "text/event-stream"}
    assert model(completions["200"]) == "CompletionResponse"
    assert completions["200"]["content"]["text/event-stream"]["schema"] == {"type": "string"}
    for status, response in completions.items():
        if status != "200":
            # 422 included: the server's own ErrorResponse, not FastAPI's HTTPValidationError.
            assert set(response["content"]) == {"application/json"} and model(response) == "ErrorResponse", status
    assert "Retry-After" in completions["429"]["headers"] and "Retry-After" in completions["503"]["headers"]
    models = spec["paths"]["/v4/models"]["get"]["responses"]
    assert (model(models["200"]), model(models["401"])) == ("ModelList", "ErrorResponse")
    readyz = spec["paths"]["/readyz"]["get"]["responses"]
    assert (model(readyz["200"]), model(readyz["503"])) == ("Readiness", "Readiness")


# ----- fields the server ignores ---------------------------------------------------------


def ignored_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == ROUTES_LOGGER and "ignored fields" in r.getMessage()]


async def test_ignored_fields_are_logged_once_by_name_escaped_never_by_value(
    tmp_path: Path, registry: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "value-that-must-not-be-logged"
    body = {
        "model": "stand-in",
        "prompt": "hi",
        "seed": secret,
        "evil\nFORGED line\x1b[2K": secret,
        "model_parameters": {"max_tokens": 2, "topK": 5, "max_token": secret},
    }
    app = make_app(tmp_path, registry, Starter())
    async with running(app) as http:
        with caplog.at_level(logging.WARNING, logger=ROUTES_LOGGER):
            response = await http.post("/v4/completions", json=body)
    assert response.status_code == 200, response.text
    lines = ignored_lines(caplog)
    assert lines == [
        "POST /v4/completions: ignored fields: 'seed', 'evil\\nFORGED line\\x1b[2K', 'model_parameters.max_token'"
    ]
    assert lines[0].isprintable() and secret not in caplog.text
    assert next(r for r in caplog.records if r.name == ROUTES_LOGGER).levelno == logging.WARNING


async def test_a_request_of_known_fields_and_aliases_logs_nothing(
    tmp_path: Path, registry: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    body = {
        "model": "stand-in",
        "prompt": "hi",
        "account_id": "acct",
        "stream": False,
        "model_parameters": {"temperature": 0, "max_tokens": 2, "topK": 1, "topP": 0.5, "stop_sequences": ["x"]},
    }
    app = make_app(tmp_path, registry, Starter())
    async with running(app) as http:
        with caplog.at_level(logging.INFO, logger=ROUTES_LOGGER):
            assert (await http.post("/v4/completions", json=body)).status_code == 200
    assert ignored_lines(caplog) == []


async def test_fields_ignored_by_a_refused_request_are_logged_too(
    tmp_path: Path, registry: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    body = {"model": "no-such-model", "prompt": "hi", "images": [{"image_url": "https://x.test/a.png", "alt": "a"}]}
    app = make_app(tmp_path, registry, Starter())
    async with running(app) as http:
        with caplog.at_level(logging.WARNING, logger=ROUTES_LOGGER):
            assert (await http.post("/v4/completions", json=body)).status_code == 404
    assert ignored_lines(caplog) == ["POST /v4/completions: ignored fields: 'images[0].alt'"]


async def test_a_flood_of_unknown_fields_makes_one_bounded_line(
    tmp_path: Path, registry: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    extra = {f"{'k' * 500}{i}": i for i in range(MAX_LOGGED_FIELDS + 30)}
    app = make_app(tmp_path, registry, Starter())
    async with running(app) as http:
        with caplog.at_level(logging.WARNING, logger=ROUTES_LOGGER):
            response = await http.post("/v4/completions", json={"model": "stand-in", "prompt": "hi", **extra})
    assert response.status_code == 200
    [line] = ignored_lines(caplog)
    assert line.endswith(" and 30 more")
    assert len(line) < MAX_LOGGED_FIELDS * 110


# ----- the probes ----------------------------------------------------------------------


async def test_the_probes_answer_as_before_while_a_preloaded_model_loads(tmp_path: Path, registry: Registry) -> None:
    starter = Starter(hold=True)
    app = make_app(tmp_path, registry, starter, preload=["stand-in"])
    assert isinstance(state_of(app), AppState)
    async with running(app) as http:
        health = await http.get("/healthz", headers={"x-api-key": ""})
        assert (health.status_code, health.json()) == (200, {"status": "ok"})
        loading = await http.get("/readyz")
        assert (loading.status_code, loading.json()) == (503, {"status": "loading", "preload": ["stand-in"]})
        starter.release.set()
        # The load resolves its weights in a worker thread: wait by the clock, not by loop turns.
        deadline = asyncio.get_running_loop().time() + 30
        while (ready := await http.get("/readyz")).status_code != 200:
            assert asyncio.get_running_loop().time() < deadline, ready.text
            await asyncio.sleep(0.01)
        assert (ready.status_code, json.loads(ready.content)) == (200, {"status": "ready", "preload": ["stand-in"]})


def test_an_application_not_built_by_create_app_has_no_state() -> None:
    with pytest.raises(RuntimeError, match="create_app"):
        state_of(FastAPI())
