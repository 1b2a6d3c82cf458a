"""``v4serve serve --ray``: the same API in front of engine-pool replicas on a Ray cluster.

One Ray node on loopback (tests/ray_cluster.py) with custom resources ``host_a`` and
``host_b`` standing for two nodes; the ingress runs as ``v4serve serve --ray ADDRESS``
and places one replica on each. Two tiny models on the transformers engine (engines in
the replica's own process, so killing a replica's process leaves nothing behind, as
losing a node would). What is proven, by the replica header, the replicas' engine-start
counters and the replica processes themselves:

- each model stays on the replica that loaded it across 50 alternating requests;
- streaming, errors and the ``scale-gp`` SDK work through the ingress as on one machine;
- SIGKILL of a replica's process ends its stream under way with ``event: error``, and
  the model's next requests load it on the other replica and succeed.
"""

from __future__ import annotations

import collections
import json
import os
import signal
from collections.abc import Iterator
from typing import Any

import httpx
import psutil
import pytest
from scale_gp import SGPClient

from tests.conftest import API_KEY, FIXTURES, TEST_HOME, RunningServer
from tests.ray_cluster import HOSTS, RayNode, cluster_view, start_ingress

pytestmark = pytest.mark.slow

LLAMA, MPT = "tiny-ray-llama", "tiny-ray-mpt"
REPLICA_HEADER = "x-v4serve-replica"


def models_view(server: RunningServer) -> dict[str, dict[str, Any]]:
    with server.client() as http:
        response = http.get("/v4/models")
    assert response.status_code == 200, response.text
    return {m["id"]: m for m in response.json()["models"]}


@pytest.fixture(scope="module")
def ingress(ray_node: RayNode, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    args = ["--ray-min-replicas", "2"]
    for host in HOSTS:
        args += ["--ray-replica-resource", host]
    log_dir = tmp_path_factory.mktemp("ray-ingress")
    server = start_ingress(ray_node, log_dir, args, replicas=len(HOSTS), registry_files=[FIXTURES / "ray_overlay.yaml"])
    yield server
    server.stop()


def complete(server: RunningServer, model: str, max_tokens: int = 4) -> httpx.Response:
    body = {"model": model, "prompt": "Hello there", "model_parameters": {"temperature": 0, "max_tokens": max_tokens}}
    with server.client() as http:
        return http.post("/v4/completions", json=body)


def test_each_model_stays_on_its_replica(ingress: RunningServer) -> None:
    served: dict[str, collections.Counter[str]] = {LLAMA: collections.Counter(), MPT: collections.Counter()}
    for i in range(50):
        model = (LLAMA, MPT)[i % 2]
        response = complete(ingress, model)
        assert response.status_code == 200, response.text
        served[model][response.headers[REPLICA_HEADER]] += 1
    # Each model went to one replica all 50 times, and not the same one: no thrash.
    assert [len(counts) for counts in served.values()] == [1, 1], served
    llama_replica, mpt_replica = (next(iter(counts)) for counts in served.values())
    resources = {r["name"]: r["resource"] for r in cluster_view(ingress)["replicas"]}
    assert {resources[llama_replica], resources[mpt_replica]} == set(HOSTS)

    # Each replica started one engine, of its own model, once: nothing was loaded twice.
    models = models_view(ingress)
    for model, replica in ((LLAMA, llama_replica), (MPT, mpt_replica)):
        assert models[model]["replica"] == replica
        assert [(r["replica"], r["state"], r["engine_starts"]) for r in models[model]["replicas"]] == [
            (replica, "ready", 1)
        ]
    assert {r["name"]: r["loads"] for r in cluster_view(ingress)["replicas"]} == {llama_replica: 1, mpt_replica: 1}


def sse_events(response: httpx.Response) -> Iterator[tuple[str, dict[str, Any]]]:
    """(event name, data) of each server-sent event; the name is "message" unless given."""
    name = "message"
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            yield name, json.loads(line.removeprefix("data: "))
            name = "message"


def test_streaming_matches_the_whole_answer(ingress: RunningServer) -> None:
    body = {"model": MPT, "prompt": "Hello there", "model_parameters": {"temperature": 0, "max_tokens": 12}}
    whole = complete(ingress, MPT, max_tokens=12).json()
    with ingress.client() as http, http.stream("POST", "/v4/completions", json={**body, "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        replica = response.headers[REPLICA_HEADER]
        events = list(sse_events(response))
    assert [name for name, _ in events] == ["message"] * len(events)
    assert "".join(data["completion"]["text"] for _, data in events) == whole["completion"]["text"]
    assert events[-1][1]["token_usage"] == whole["token_usage"]
    assert replica == models_view(ingress)[MPT]["replica"]


def test_sdk_through_the_ingress(ingress: RunningServer) -> None:
    client = SGPClient(api_key=API_KEY, base_url=ingress.base_url, max_retries=0, timeout=600)
    response = client.completions.create(
        model=LLAMA, prompt="Once upon a time", model_parameters={"temperature": 0, "max_tokens": 6}
    )
    assert response.completion.text
    assert 1 <= response.token_usage.completion <= 6
    chunks = list(
        client.completions.create(
            model=LLAMA, prompt="Once upon a time", model_parameters={"temperature": 0, "max_tokens": 6}, stream=True
        )
    )
    assert "".join(c.model_dump()["completion"]["text"] for c in chunks) == response.completion.text


def test_errors_are_the_same_json(ingress: RunningServer) -> None:
    with ingress.client() as http:
        unknown = http.post("/v4/completions", json={"model": "no-such-model", "prompt": "x"})
        invalid = http.post("/v4/completions", json={"model": LLAMA, "prompt": 3})
        too_long = http.post(
            "/v4/completions", json={"model": MPT, "prompt": "x", "model_parameters": {"max_tokens": 100_000}}
        )
    with ingress.client(api_key=None) as http:
        anonymous = http.post("/v4/completions", json={"model": LLAMA, "prompt": "x"})
    for response, status in ((unknown, 404), (invalid, 422), (too_long, 400), (anonymous, 401)):
        assert response.status_code == status, response.text
        assert set(response.json()["error"]) >= {"message", "type"}
    # A request refused by the replica (the context check runs there) names no stack.
    assert "max_tokens" in too_long.json()["error"]["message"]
    assert "Traceback" not in too_long.text


def test_chat_templates_and_token_echoes_are_the_replicas(ingress: RunningServer) -> None:
    """The ingress has no tokenizer: the model's replica renders a conversation with the
    model's template and decodes echoed token IDs (calls the ingress awaits, never blocks on)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TEST_HOME / "builtin" / "tiny-llama")
    messages = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Hello"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    rendered_ids = tokenizer(rendered, add_special_tokens=False).input_ids
    greedy = {"max_tokens": 6, "temperature": 0}
    with ingress.client() as http:
        chat = http.post("/v1/chat/completions", json={"model": LLAMA, "messages": messages, **greedy})
        raw = http.post("/v1/completions", json={"model": LLAMA, "prompt": rendered_ids, **greedy})
        echoed = http.post("/v1/completions", json={"model": LLAMA, "prompt": rendered_ids, "echo": True, **greedy})
    for response in (chat, raw, echoed):
        assert response.status_code == 200, response.text
    assert chat.json()["usage"]["prompt_tokens"] == len(rendered_ids)
    answer = raw.json()["choices"][0]["text"]
    assert chat.json()["choices"][0]["message"]["content"] == answer
    assert echoed.json()["choices"][0]["text"] == tokenizer.decode(rendered_ids) + answer


def test_killed_replica_moves_its_model(ingress: RunningServer) -> None:
    models = models_view(ingress)
    victim_name, survivor_name = models[LLAMA]["replica"], models[MPT]["replica"]
    replicas = {r["name"]: r for r in cluster_view(ingress)["replicas"]}
    victim = psutil.Process(replicas[victim_name]["pid"])
    assert victim.is_running()

    # A stream under way on the victim: greedy, the whole 2,000 tokens unless cut off.
    body = {
        "model": LLAMA,
        "prompt": "Hello",
        "stream": True,
        "model_parameters": {"temperature": 0, "max_tokens": 2000, "stop_sequences": ["never-xyz"]},
    }
    events: list[tuple[str, dict[str, Any]]] = []
    with ingress.client() as http, http.stream("POST", "/v4/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers[REPLICA_HEADER] == victim_name
        for event in sse_events(response):
            events.append(event)
            if len(events) == 3:
                os.kill(victim.pid, signal.SIGKILL)
    assert events[-1][0] == "error", events[-3:]
    assert events[-1][1]["error"]["code"] == 503
    assert sum(data["completion"]["text"] != "" for name, data in events if name == "message") < 2000

    # The next request loads the model on a live replica (the survivor, unless a
    # replacement for the lost one is ready first and has more room) and succeeds; so
    # do the ones after it, there. The other model stays where it was.
    served = {model: complete(ingress, model) for model in (LLAMA, MPT)}
    assert [response.status_code for response in served.values()] == [200, 200]
    assert served[MPT].headers[REPLICA_HEADER] == survivor_name
    new_home = served[LLAMA].headers[REPLICA_HEADER]
    assert new_home != victim_name
    for _ in range(4):
        response = complete(ingress, LLAMA)
        assert (response.status_code, response.headers[REPLICA_HEADER]) == (200, new_home)
    models = models_view(ingress)
    assert models[LLAMA]["replica"] == new_home
    assert [(r["replica"], r["state"], r["engine_starts"]) for r in models[LLAMA]["replicas"]] == [
        (new_home, "ready", 1)
    ]
    replicas = {r["name"]: r for r in cluster_view(ingress)["replicas"]}
    assert victim_name not in replicas
    assert replicas[new_home]["pid"] != victim.pid
    assert not victim.is_running() or victim.status() == psutil.STATUS_ZOMBIE
    assert f"replica {victim_name} is gone" in ingress.log()
