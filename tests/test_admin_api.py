"""The admin API in process: who may use it, what it refuses, and what each change does to
the pool, with stand-in engines (tests/in_process.py).

A request in flight is stood for by a lease taken from the pool, exactly what a request
holds while its engine serves it. The stand-in engine takes no adapter at run time
(``Engine.add_adapter``'s default), as an engine started without LoRA; where a test needs
one that does, it says so. The real engine taking a LoRA adapter live is tested in
tests/test_admin_live.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from server.api.admin import reload_on_sighup
from server.api.state import state_of
from server.engines import AdapterRef
from server.registry import Registry, load_registry
from server.registry.operator import load_serving_registry, operator_file
from tests.conftest import API_KEYS
from tests.in_process import InProcessServer, StandInEngine, serve_in_process

ADMIN_KEY = "admin-key"
KEYS = f"{API_KEYS},{ADMIN_KEY}::admin"
ADMIN = {"x-api-key": ADMIN_KEY}
NEW_MODEL = {"source": "builtin:tiny-llama", "max_model_len": 512, "description": "added live"}


def overlay(tmp_path: Path, adapter_dir: Path) -> Path:
    """An operator registry file: a base with one adapter, and a model an alias names."""
    path = tmp_path / "overlay.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "models": {
                    "base-a": {"source": "builtin:tiny-llama", "max_model_len": 1024},
                    "lora-1": {"base": "base-a", "adapter": str(adapter_dir)},
                    "other": {"source": "builtin:tiny-llama"},
                },
                "aliases": {"other-alias": "other"},
            }
        )
    )
    return path


@pytest.fixture
def adapter_dir(tmp_path: Path) -> Path:
    """A LoRA adapter as far as the pool reads one before its engine does: its rank."""
    directory = tmp_path / "adapter"
    directory.mkdir()
    (directory / "adapter_config.json").write_text(json.dumps({"r": 8}))
    return directory


@pytest.fixture
async def admin(tmp_path: Path, adapter_dir: Path) -> AsyncIterator[InProcessServer]:
    """The application over the shipped registry and ``overlay``, with an admin key."""
    registry_file = overlay(tmp_path, adapter_dir)
    home = tmp_path / "home"
    registry = load_serving_registry([registry_file], operator_file(home))
    async with serve_in_process(home, registry=registry, api_keys=KEYS, registry_files=[registry_file]) as server:
        yield server


def registry_of(server: InProcessServer) -> Registry:
    return state_of(server.app).pool.registry


async def until(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    """Until ``condition`` holds: for what the pool does in the background (retiring an
    engine, loading one), which may wait on a worker thread."""

    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), timeout)


async def complete(server: InProcessServer, model: str) -> Any:
    async with server.client() as http:
        return await http.post(
            "/v4/completions", json={"model": model, "prompt": "a b", "model_parameters": {"max_tokens": 3}}
        )


# ----- who may use it --------------------------------------------------------------------

ROUTES = [
    ("GET", "/v4/admin/models/other", None),
    ("PUT", "/v4/admin/models/new-model", NEW_MODEL),
    ("DELETE", "/v4/admin/models/other", None),
    ("POST", "/v4/admin/models/other/load", None),
    ("POST", "/v4/admin/models/other/unload", None),
    ("POST", "/v4/admin/models/other/pin", None),
    ("POST", "/v4/admin/models/other/unpin", None),
    ("POST", "/v4/admin/registry/reload", None),
]


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
async def test_only_admin_keys_reach_the_admin_api(admin: InProcessServer, method: str, path: str, body: Any) -> None:
    before = {m.model_id: m.entry for m in registry_of(admin)}
    async with admin.client(api_key=None) as http:
        missing = await http.request(method, path, json=body)
    async with admin.client() as http:
        ordinary = await http.request(method, path, json=body)
    assert missing.status_code == 401, missing.text
    assert missing.json()["error"]["type"] == "authentication_error"
    assert ordinary.status_code == 403, ordinary.text
    assert ordinary.json()["error"]["type"] == "permission_denied"
    assert "admin key" in ordinary.json()["error"]["message"]
    assert {m.model_id: m.entry for m in registry_of(admin)} == before
    assert not operator_file(_home(admin)).exists()
    assert admin.engines == {}  # nothing was loaded either


def _home(server: InProcessServer) -> Path:
    return Path(server.app.state.v4admin.operator_path).parent


async def test_an_open_server_lets_anyone_administer_it(tmp_path: Path) -> None:
    # No keys at all: every caller may do anything, the admin API included (as /v4/usage).
    async with serve_in_process(tmp_path, api_keys="") as server, server.client(api_key=None) as http:
        response = await http.get("/v4/admin/models/tiny-llama")
    assert response.status_code == 200, response.text
    assert response.json()["entry"]["source"] == "builtin:tiny-llama"


# ----- adding, replacing, removing entries -----------------------------------------------


async def test_put_adds_a_model_that_serves_at_once_and_survives_a_restart(admin: InProcessServer) -> None:
    async with admin.client(headers=ADMIN) as http:
        added = await http.put("/v4/admin/models/new-model", json=NEW_MODEL)
        again = await http.put("/v4/admin/models/new-model", json=NEW_MODEL)
        shown = await http.get("/v4/admin/models/new-model")
        listed = await http.get("/v4/models")
    assert added.status_code == 201, added.text
    body = added.json()
    assert body["created"] is True
    assert body["changes"] == {
        "added": ["new-model"],
        "removed": [],
        "changed": [],
        "restarted": [],
        "live_adapters": [],
    }
    assert body["entry"]["max_model_len"] == 512
    assert body["status"]["state"] == "not_loaded"
    assert (again.status_code, again.json()["created"], again.json()["changes"]["added"]) == (200, False, [])
    assert shown.json()["origin"] == str(operator_file(_home(admin)))
    assert "new-model" in [m["id"] for m in listed.json()["models"]]
    response = await complete(admin, "new-model")
    assert response.status_code == 200, response.text
    assert admin.engines["new-model"].max_model_len == 512

    # Persisted: the operator file holds the keys the operator set, and the registry a
    # restart reads serves it.
    saved = yaml.safe_load(operator_file(_home(admin)).read_text())
    assert saved == {"models": {"new-model": NEW_MODEL}, "removed": []}
    files = admin.app.state.v4admin.registry_files
    restarted = load_serving_registry(files, operator_file(_home(admin)))
    assert restarted.model("new-model") is not None
    assert restarted.model("new-model").entry == registry_of(admin).model("new-model").entry


@pytest.mark.parametrize(
    ("entry", "key", "says"),
    [
        ({"source": "builtin:tiny-llama", "dtpye": "float16"}, "dtpye", "Extra inputs are not permitted"),
        ({"source": "builtin:tiny-llama", "dtype": "float8"}, "dtype", "Input should be"),
        ({"source": "builtin:tiny-llama", "max_model_len": 4}, "max_model_len", "greater than or equal to 16"),
        ({"source": "builtin:tiny-llama", "engine_args": {"dtype": "half"}}, "engine_args", "must be set with the"),
        ({}, None, "an entry needs 'source'"),
        ({"base": "no-such-model", "adapter": "/adapters/x"}, "base", "'no-such-model' is not a registered model ID"),
        ({"base": "lora-1", "adapter": "/adapters/x"}, "base", "'lora-1' is itself a LoRA adapter"),
        ({"source": "builtin:tiny-llama", "aliases": ["tiny"]}, "aliases", "already the ID or an alias of model"),
        (
            {"source": "builtin:tiny-llama", "engine": "transformers", "architecture": "NoSuchForCausalLM"},
            "architecture",
            "has no model class 'NoSuchForCausalLM'",
        ),
    ],
)
async def test_an_entry_a_registry_file_could_not_hold_is_refused_naming_model_and_key(
    admin: InProcessServer, entry: dict[str, Any], key: str | None, says: str
) -> None:
    before = {m.model_id: m.entry for m in registry_of(admin)}
    async with admin.client(headers=ADMIN) as http:
        response = await http.put("/v4/admin/models/bad-model", json=entry)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_registry_entry"
    assert "model 'bad-model'" in error["message"]
    assert says in error["message"]
    if key is not None:
        assert f"key '{key}'" in error["message"]
        assert error["param"] == key
    assert {m.model_id: m.entry for m in registry_of(admin)} == before
    assert not operator_file(_home(admin)).exists()
    assert (await complete(admin, "other")).status_code == 200  # still serving


@pytest.mark.parametrize(
    ("path", "content", "status"),
    [
        ("/v4/admin/models/bad-model", b"[1, 2]", 422),  # JSON, but not an entry
        ("/v4/admin/models/bad-model", b"{not json", 400),
        ("/v4/admin/models/bad%20model", json.dumps(NEW_MODEL).encode(), 422),  # not an ID a path takes
    ],
)
async def test_a_malformed_put_gets_a_json_error(
    admin: InProcessServer, path: str, content: bytes, status: int
) -> None:
    async with admin.client(headers={**ADMIN, "content-type": "application/json"}) as http:
        response = await http.put(path, content=content)
    assert response.status_code == status, response.text
    assert set(response.json()["error"]) >= {"message", "type", "param", "code"}


async def test_unknown_models_are_404(admin: InProcessServer) -> None:
    async with admin.client(headers=ADMIN) as http:
        for method, path in [
            ("GET", "/v4/admin/models/nope"),
            ("DELETE", "/v4/admin/models/nope"),
            ("POST", "/v4/admin/models/nope/load"),
            ("POST", "/v4/admin/models/nope/unload"),
            ("POST", "/v4/admin/models/nope/pin"),
            ("GET", "/v4/admin/models/other-alias"),  # an alias is not an entry's ID
        ]:
            response = await http.request(method, path)
            assert response.status_code == 404, (method, path, response.text)
            assert response.json()["error"]["type"] == "model_not_found"


async def test_delete_removes_an_entry_of_the_files_for_good(admin: InProcessServer) -> None:
    async with admin.client(headers=ADMIN) as http:
        refused = await http.delete("/v4/admin/models/other")  # other-alias names it
        base_refused = await http.delete("/v4/admin/models/base-a")  # lora-1 runs on it
        removed = await http.delete("/v4/admin/models/tiny-llama")
        again = await http.delete("/v4/admin/models/tiny-llama")
    assert refused.status_code == 409, refused.text
    assert "other-alias" in refused.json()["error"]["message"]
    assert base_refused.status_code == 409
    assert "lora-1" in base_refused.json()["error"]["message"]
    assert removed.status_code == 200, removed.text
    assert removed.json()["removed"] == ["tiny-llama"]
    assert again.status_code == 404
    response = await complete(admin, "tiny")  # its alias went with it
    assert response.status_code == 404
    saved = yaml.safe_load(operator_file(_home(admin)).read_text())
    assert saved == {"models": {}, "removed": ["tiny-llama"]}
    files = admin.app.state.v4admin.registry_files
    assert load_serving_registry(files, operator_file(_home(admin))).model("tiny-llama") is None


async def test_concurrent_changes_all_land(admin: InProcessServer) -> None:
    async with admin.client(headers=ADMIN) as http:
        responses = await asyncio.gather(
            *(http.put(f"/v4/admin/models/m{i}", json=NEW_MODEL) for i in range(5)),
            http.delete("/v4/admin/models/tiny-llama"),
        )
    assert [r.status_code for r in responses] == [201] * 5 + [200]
    saved = yaml.safe_load(operator_file(_home(admin)).read_text())
    assert sorted(saved["models"]) == [f"m{i}" for i in range(5)]
    assert saved["removed"] == ["tiny-llama"]
    assert all(registry_of(admin).model(f"m{i}") is not None for i in range(5))


# ----- what changes do to engines ------------------------------------------------------


async def test_replacing_a_loaded_model_lets_its_requests_finish_on_the_old_engine(admin: InProcessServer) -> None:
    pool = state_of(admin.app).pool
    lease = await pool.lease("other")  # a request in flight
    old = lease.engine
    assert isinstance(old, StandInEngine)
    shut_down: list[int] = []
    old.shutdown = lambda: _record(shut_down, old)  # type: ignore[method-assign]
    async with admin.client(headers=ADMIN) as http:
        response = await http.put("/v4/admin/models/other", json={"source": "builtin:tiny-llama", "max_model_len": 256})
    assert response.status_code == 200, response.text
    assert response.json()["changes"]["restarted"] == ["other"]
    assert response.json()["changes"]["changed"] == ["other"]
    # The request in flight keeps its engine, which serves it to the end.
    await asyncio.sleep(0)
    assert shut_down == []
    prepared = await old.prepare("a b", _options(4))
    deltas = [d async for d in old.generate(prepared, "in-flight")]
    assert deltas[-1].finish_reason == "length"
    lease.release()
    await until(lambda: shut_down == [0])  # shut down once its last request ended, with none running
    # The model loads again at once, as it was loaded, on a new engine.
    await until(lambda: admin.engines["other"] is not old)
    assert admin.engines["other"].max_model_len == 256
    assert (await complete(admin, "other")).status_code == 200


async def test_removing_a_loaded_model_lets_its_requests_finish_then_unloads_it(admin: InProcessServer) -> None:
    async with admin.client(headers=ADMIN) as http:
        assert (await http.put("/v4/admin/models/new-model", json=NEW_MODEL)).status_code == 201
    lease = await state_of(admin.app).pool.lease("new-model")  # a request in flight
    engine = lease.engine
    assert isinstance(engine, StandInEngine)
    shut_down: list[int] = []
    engine.shutdown = lambda: _record(shut_down, engine)  # type: ignore[method-assign]
    async with admin.client(headers=ADMIN) as http:
        removed = await http.delete("/v4/admin/models/new-model")
    assert removed.json()["removed"] == ["new-model"]
    assert (await complete(admin, "new-model")).status_code == 404  # new requests: gone
    await asyncio.sleep(0)
    assert shut_down == []  # the one in flight keeps its engine
    lease.release()
    await until(lambda: shut_down == [0])


async def test_metrics_follow_registry_changes(admin: InProcessServer) -> None:
    """A draining engine's request still counts under its model; a removed model leaves
    the gauges."""
    pool = state_of(admin.app).pool
    lease = await pool.lease("other")  # a request in flight on the engine about to be replaced
    async with admin.client(headers=ADMIN) as http:
        replaced = await http.put("/v4/admin/models/other", json={"source": "builtin:tiny-llama", "max_model_len": 256})
        removed = await http.delete("/v4/admin/models/tiny-llama")
        scraped = gauges(await http.get("/metrics"))
    assert (replaced.status_code, removed.status_code) == (200, 200)
    assert scraped[("v4serve_running_requests", "other")] == 1
    assert ("v4serve_running_requests", "tiny-llama") not in scraped
    lease.release()


def gauges(response: Any) -> dict[tuple[str, str], float]:
    """(metric, model) -> value of the per-model gauges in a /metrics answer."""
    from prometheus_client.parser import text_string_to_metric_families

    assert response.status_code == 200, response.text
    return {
        (sample.name, sample.labels["model"]): sample.value
        for family in text_string_to_metric_families(response.text)
        if family.name in ("v4serve_running_requests", "v4serve_queued_requests")
        for sample in family.samples
    }


async def _record(log: list[int], engine: StandInEngine) -> None:
    log.append(len(engine.running))


def _options(max_tokens: int) -> Any:
    from server.engines import SamplingOptions

    return SamplingOptions(max_tokens=max_tokens, temperature=0.0)


async def test_changing_serving_settings_keeps_the_engine(admin: InProcessServer) -> None:
    assert (await complete(admin, "other")).status_code == 200
    engine = admin.engines["other"]
    async with admin.client(headers=ADMIN) as http:
        response = await http.put(
            "/v4/admin/models/other", json={"source": "builtin:tiny-llama", "default_max_tokens": 7, "max_queued": 3}
        )
    assert response.json()["changes"] == {
        "added": [],
        "removed": [],
        "changed": ["other"],
        "restarted": [],
        "live_adapters": [],
    }
    async with admin.client() as http:
        response = await http.post("/v4/completions", json={"model": "other", "prompt": "a b"})
    assert response.json()["token_usage"]["completion"] == 7  # the new default, on the same engine
    assert admin.engines["other"] is engine


async def test_a_new_adapter_on_a_loaded_base_that_takes_adapters_live_keeps_its_engine(
    admin: InProcessServer, adapter_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Stand-in for vLLM's runtime LoRA loading: this engine takes any adapter it is given.
    taken: list[AdapterRef] = []
    monkeypatch.setattr(StandInEngine, "add_adapter", lambda self, ref: taken.append(ref) or True, raising=False)
    assert (await complete(admin, "lora-1")).status_code == 200
    engine = admin.engines["base-a"]
    async with admin.client(headers=ADMIN) as http:
        response = await http.put("/v4/admin/models/lora-2", json={"base": "base-a", "adapter": str(adapter_dir)})
    assert response.status_code == 201, response.text
    changes = response.json()["changes"]
    assert (changes["added"], changes["live_adapters"], changes["restarted"]) == (["lora-2"], ["lora-2"], [])
    assert taken == [AdapterRef("lora-2", str(adapter_dir), 8)]
    assert (await complete(admin, "lora-2")).status_code == 200
    assert admin.engines["base-a"] is engine
    assert engine.prepared[-1].adapter == "lora-2"


async def test_a_new_adapter_on_a_base_that_cannot_take_it_live_restarts_the_base(
    admin: InProcessServer, adapter_dir: Path
) -> None:
    assert (await complete(admin, "base-a")).status_code == 200
    engine = admin.engines["base-a"]
    async with admin.client(headers=ADMIN) as http:
        response = await http.put("/v4/admin/models/lora-2", json={"base": "base-a", "adapter": str(adapter_dir)})
    changes = response.json()["changes"]
    assert (changes["live_adapters"], changes["restarted"]) == ([], ["base-a"])
    assert (await complete(admin, "lora-2")).status_code == 200
    assert admin.engines["base-a"] is not engine


async def test_an_adapter_whose_weights_are_missing_leaves_its_base_serving(
    admin: InProcessServer, tmp_path: Path
) -> None:
    assert (await complete(admin, "base-a")).status_code == 200
    async with admin.client(headers=ADMIN) as http:
        response = await http.put("/v4/admin/models/lora-2", json={"base": "base-a", "adapter": str(tmp_path / "none")})
    assert response.status_code == 201, response.text
    assert response.json()["status"]["state"] == "failed"
    failed = await complete(admin, "lora-2")
    assert failed.status_code == 503
    assert str(tmp_path) not in failed.json()["error"]["message"]
    assert (await complete(admin, "base-a")).status_code == 200


# ----- load, unload, pin, unpin ----------------------------------------------------------


async def test_load_unload_pin_and_unpin(admin: InProcessServer) -> None:
    pool = state_of(admin.app).pool
    async with admin.client(headers=ADMIN) as http:
        loaded = await http.post("/v4/admin/models/other/load")
        assert (loaded.status_code, loaded.json()["status"]["state"]) == (200, "ready")
        lease = await pool.lease("other")
        busy = await http.post("/v4/admin/models/other/unload")
        assert busy.status_code == 409, busy.text
        assert "serving 1 request" in busy.json()["error"]["message"]
        lease.release()
        unloaded = await http.post("/v4/admin/models/other/unload")
        assert (unloaded.status_code, unloaded.json()["status"]["state"]) == (200, "not_loaded")

        pinned = await http.post("/v4/admin/models/other/pin")
        assert pinned.status_code == 200, pinned.text
        assert pinned.json()["entry"]["pinned"] is True
        await until(lambda: _state(admin, "other") == "ready")  # a pinned model loads at once
        refused = await http.post("/v4/admin/models/other/unload")
        assert refused.status_code == 409
        assert "pinned" in refused.json()["error"]["message"]
        saved = yaml.safe_load(operator_file(_home(admin)).read_text())
        assert saved["models"]["other"] == {"source": "builtin:tiny-llama", "pinned": True}

        unpinned = await http.post("/v4/admin/models/other/unpin")
        assert unpinned.json()["entry"]["pinned"] is False
        assert (await http.post("/v4/admin/models/other/unload")).status_code == 200

        adapter = await http.post("/v4/admin/models/lora-1/unload")
        assert adapter.status_code == 409
        assert "unload that model" in adapter.json()["error"]["message"]
        adapter_pin = await http.post("/v4/admin/models/lora-1/pin")
        assert adapter_pin.status_code == 409


def _state(server: InProcessServer, model_id: str) -> str:
    return next(s.state.value for s in state_of(server.app).pool.status() if s.model_id == model_id)


# ----- reloading the registry files ------------------------------------------------------


async def test_reload_applies_the_files_as_they_are_now(admin: InProcessServer, adapter_dir: Path) -> None:
    registry_file = admin.app.state.v4admin.registry_files[0]
    content = yaml.safe_load(registry_file.read_text())
    content["models"]["from-file"] = {"source": "builtin:tiny-llama"}
    del content["models"]["lora-1"]
    registry_file.write_text(yaml.safe_dump(content))
    async with admin.client(headers=ADMIN) as http:
        response = await http.post("/v4/admin/registry/reload")
        assert response.status_code == 200, response.text
        assert (response.json()["added"], response.json()["removed"]) == (["from-file"], ["lora-1"])
        assert (await complete(admin, "from-file")).status_code == 200
        assert (await complete(admin, "lora-1")).status_code == 404

        registry_file.write_text("models:\n  broken: {source: x, dtpye: float16}\n")
        refused = await http.post("/v4/admin/registry/reload")
        assert refused.status_code == 422
        assert "model 'broken': key 'dtpye'" in refused.json()["error"]["message"]
    assert registry_of(admin).model("from-file") is not None  # still the last good registry


async def test_sighup_reloads_the_registry(admin: InProcessServer) -> None:
    registry_file = admin.app.state.v4admin.registry_files[0]
    content = yaml.safe_load(registry_file.read_text())
    content["models"]["from-hangup"] = {"source": "builtin:tiny-llama"}
    registry_file.write_text(yaml.safe_dump(content))
    previous = signal.getsignal(signal.SIGHUP)
    try:
        reload_on_sighup(admin.app)
        os.kill(os.getpid(), signal.SIGHUP)
        await until(lambda: registry_of(admin).model("from-hangup") is not None)
    finally:
        signal.signal(signal.SIGHUP, previous)
    assert (await complete(admin, "from-hangup")).status_code == 200


async def test_the_operator_layer_applies_over_changed_files(tmp_path: Path) -> None:
    # What the API removed stays removed, and what it added stays, when the files change.
    from server.registry.operator import OperatorLayer, read_operator_layer, write_operator_layer
    from server.registry.schema import ModelEntry

    path = tmp_path / "operator_registry.yaml"
    assert read_operator_layer(path) == OperatorLayer()
    layer = (
        OperatorLayer()
        .with_entry("added", ModelEntry(source="builtin:tiny-llama"))
        .without("tiny-llama", in_files=True)
    )
    write_operator_layer(path, layer)
    assert read_operator_layer(path) == layer
    registry = load_serving_registry([], path)
    assert registry.model("added") is not None and registry.model("tiny-llama") is None
    assert registry.model("added").origin == path
    assert len(registry) == len(load_registry())  # one in, one out
    path.write_text("models: {x: {dtype: float8}}\n")
    with pytest.raises(ValueError, match=r"model 'x': key 'dtype'"):
        load_serving_registry([], path)


def test_the_keys_an_engine_serves_through_are_entry_keys() -> None:
    from server.pool.live import SERVING_KEYS, needs_new_engine
    from server.registry.schema import ModelEntry

    assert set(ModelEntry.model_fields) > SERVING_KEYS
    entry = ModelEntry(source="builtin:tiny-llama")
    assert not needs_new_engine(entry, entry.model_copy(update={"pinned": True, "default_max_tokens": 5}))
    assert needs_new_engine(entry, entry.model_copy(update={"engine_args": {"enforce_eager": True}}))
    assert needs_new_engine(entry, entry.model_copy(update={"source": "builtin:tiny-chat"}))


async def test_a_preloaded_model_removed_is_waited_for_no_more(tmp_path: Path) -> None:
    async with serve_in_process(tmp_path, api_keys=KEYS, preload=["tiny-llama"]) as server:
        async with server.client(headers=ADMIN) as http:
            assert (await http.delete("/v4/admin/models/tiny-llama")).status_code == 200
            ready = await http.get("/readyz")
    assert ready.status_code == 200, ready.text


def test_v4serve_models_lists_what_a_server_with_this_home_serves(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from server.cli import main
    from server.registry.operator import OperatorLayer, write_operator_layer
    from server.registry.schema import ModelEntry

    layer = OperatorLayer().with_entry("added-live", ModelEntry(source="builtin:tiny-llama"))
    write_operator_layer(operator_file(tmp_path), layer.without("tiny-llama", in_files=True))
    assert main(["models", "--home", str(tmp_path)]) == 0
    ids = [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]]
    assert "added-live" in ids
    assert "tiny-llama" not in ids
