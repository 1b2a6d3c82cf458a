"""The admin API on a real server with the real vLLM engine: a LoRA adapter added while
its base serves, without restarting the base's engine; a reload on SIGHUP; the base's
entry replaced while a request streams from it, which ends whole before the old engine
goes; and the changes still there after a restart.

The tiny base model and its tiny adapter are generated locally (``builtin:`` sources);
the server gets a home of its own, so its operator file does not touch the shared test
home, with the shared builtin models linked in.
"""

from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
import yaml

from tests.conftest import API_KEYS, FIXTURES, TEST_HOME, RunningServer, start_server

pytestmark = pytest.mark.slow

ADMIN_KEY = "admin-key"
KEYS = f"{API_KEYS},{ADMIN_KEY}::admin"
PROMPT = "The quick brown fox"
LIVE_ADAPTER = {"base": "tiny-llama", "adapter": "builtin:tiny-llama-lora"}


def greedy(server: RunningServer, model: str) -> str:
    with server.client() as http:
        response = http.post(
            "/v4/completions",
            json={"model": model, "prompt": PROMPT, "model_parameters": {"temperature": 0, "max_tokens": 12}},
        )
    assert response.status_code == 200, response.text
    return str(response.json()["completion"]["text"])


def models(server: RunningServer) -> dict[str, dict]:
    with server.client() as http:
        return {m["id"]: m for m in http.get("/v4/models").json()["models"]}


def engine_loads(server: RunningServer) -> int:
    """Engines the server started so far, as its log counts them."""
    return server.log().count("loading model tiny-llama from")


def wait_for(condition, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.2)


STREAM_TOKENS = 64


def engine_core(server: RunningServer) -> psutil.Process:
    """The EngineCore process of the server's only vLLM engine."""
    children = psutil.Process(server.process.pid).children()
    cores = [p for p in children if "EngineCore" in " ".join(p.cmdline()) or p.name().startswith("VLLM::EngineCor")]
    assert len(cores) == 1, cores
    return cores[0]


def stream_to_the_end(server: RunningServer, body: dict) -> dict:
    """The stream's last event, with the request ID the server logged it under."""
    with server.client() as http, http.stream("POST", "/v4/completions", json=body) as stream:
        assert stream.status_code == 200
        *_, last = (line.removeprefix("data: ") for line in stream.iter_lines() if line.startswith("data: "))
        return {**json.loads(last), "request_id": stream.headers["x-request-id"]}


def replace_while_streaming(server: RunningServer) -> dict:
    """Stream a completion from tiny-llama, and replace tiny-llama's entry (with an engine
    key changed) while the request runs; the stream's last event.

    The old engine's EngineCore process is stopped (SIGSTOP) before the request is sent and
    let go (SIGCONT) once the replacement is answered, so the request is surely still
    running on the old engine when its entry is replaced, however fast the machine is.
    """
    core = engine_core(server)
    body = {
        "model": "tiny-llama",
        "prompt": PROMPT,
        "stream": True,
        "model_parameters": {"temperature": 0, "max_tokens": STREAM_TOKENS},
    }
    with server.client(api_key=ADMIN_KEY) as admin:
        entry = admin.get("/v4/admin/models/tiny-llama").json()["entry"]
        entry["engine_args"] = {**entry["engine_args"], "max_num_seqs": 64}
        streamer = ThreadPoolExecutor(max_workers=1)
        core.suspend()
        try:
            streamed = streamer.submit(stream_to_the_end, server, body)
            wait_for(lambda: models(server)["tiny-llama"]["running_requests"] == 1)
            replaced = admin.put("/v4/admin/models/tiny-llama", json=entry)
            assert replaced.status_code == 200, replaced.text
            assert replaced.json()["changes"]["restarted"] == ["tiny-llama"]
            assert not streamed.done()
        finally:
            core.resume()
            streamer.shutdown(wait=True)
    return streamed.result()


def test_a_lora_adapter_added_live_a_sighup_reload_and_a_restart(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (TEST_HOME / "builtin").mkdir(parents=True, exist_ok=True)
    (home / "builtin").symlink_to(TEST_HOME / "builtin")
    registry_file = tmp_path / "registry.yaml"
    registry_file.write_text("models: {}\n")
    args = {
        "registry_files": [FIXTURES / "lora_overlay.yaml", registry_file],
        "preload": ["tiny-llama"],
        "api_keys": KEYS,
        "extra_args": ["--home", str(home)],  # after the test home: the last one counts
    }
    server = start_server(tmp_path / "logs", **args)
    try:
        base_text, adapter_text = greedy(server, "tiny-llama"), greedy(server, "tiny-lora")
        assert adapter_text != base_text
        before = models(server)["tiny-llama"]
        assert engine_loads(server) == 1

        with server.client(api_key=ADMIN_KEY) as http:
            response = http.put("/v4/admin/models/tiny-lora-live", json=LIVE_ADAPTER)
        assert response.status_code == 201, response.text
        changes = response.json()["changes"]
        assert (changes["added"], changes["live_adapters"], changes["restarted"]) == (
            ["tiny-lora-live"],
            ["tiny-lora-live"],
            [],
        )
        # Served at once, with the adapter applied (the same weights as tiny-lora), by the
        # same engine: no second load, and the base's load time is the one from start-up.
        assert greedy(server, "tiny-lora-live") == adapter_text
        assert engine_loads(server) == 1
        after = models(server)["tiny-llama"]
        assert (after["state"], after["load_seconds"]) == ("ready", before["load_seconds"])
        assert greedy(server, "tiny-llama") == base_text

        # SIGHUP: the registry files are read again.
        registry_file.write_text(yaml.safe_dump({"models": {"tiny-lora-hup": LIVE_ADAPTER}}))
        os.kill(server.process.pid, signal.SIGHUP)
        wait_for(lambda: "tiny-lora-hup" in models(server))
        assert greedy(server, "tiny-lora-hup") == adapter_text
        assert engine_loads(server) == 1
        assert "tiny-lora-live" in models(server)  # the operator layer stays over the files

        # Replacing the base's entry (an engine key) while a request streams from its engine:
        # the request ends whole on the old engine, which is unloaded only after it.
        streamed = replace_while_streaming(server)
        assert streamed["completion"]["finish_reason"] == "length"
        assert streamed["token_usage"]["completion"] == STREAM_TOKENS
        wait_for(lambda: engine_loads(server) == 2 and models(server)["tiny-llama"]["state"] == "ready")
        log = server.log()
        finished = log.index(f"finish=length request_id={streamed['request_id']}")
        assert log.index("registry entry tiny-llama replaced") < finished
        assert finished < log.index("unloading model tiny-llama: its registry entry was replaced")
        # The new engine serves the base and every adapter, the live ones included.
        assert greedy(server, "tiny-lora-live") == adapter_text
        assert greedy(server, "tiny-llama") == base_text
    finally:
        server.stop()
    saved = yaml.safe_load((home / "operator_registry.yaml").read_text())["models"]
    assert saved["tiny-lora-live"] == LIVE_ADAPTER
    assert saved["tiny-llama"]["engine_args"]["max_num_seqs"] == 64

    restarted = start_server(tmp_path / "logs-again", **args)
    try:
        served = models(restarted)
        assert {"tiny-lora-live", "tiny-lora-hup"} <= set(served)
        assert served["tiny-lora-live"]["base"] == "tiny-llama"
        assert greedy(restarted, "tiny-lora-live") == adapter_text
    finally:
        restarted.stop()
