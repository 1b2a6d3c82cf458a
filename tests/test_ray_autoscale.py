"""Replicas follow the queue between the operator's bounds (``--ray-min-replicas 1``,
one per ``--ray-replica-resource``, so at most two; ``--ray-target-queue 1``).

``tiny-ray-narrow`` admits one request at a time, so a burst waits in the ingress's
queue: past one waiting request per replica, a second replica starts; once nothing waits
and the new replica holds no model, it is stopped again. Proven by the replica list
(``GET /v4/cluster``) reaching each count while the condition holds, not by timing.

Then the replica holding the model is killed (SIGKILL of its process) while one request
runs there and two wait: none had sent anything to its client, so all three are served
by the replica the model moves to.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import FIXTURES, RunningServer
from tests.ray_cluster import HOSTS, RayNode, cluster_view, start_ingress

pytestmark = pytest.mark.slow

MODEL = "tiny-ray-narrow"
# Each request generates this many tokens (greedy, no early stop): the burst outlasts
# several 2-second autoscaling checks on any machine that runs this suite.
TOKENS = 1500
BURST = 6
DEADLINE_SECONDS = 600.0


@pytest.fixture(scope="module")
def ingress(ray_node: RayNode, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    args = ["--ray-min-replicas", "1", "--ray-target-queue", "1"]
    for host in HOSTS:
        args += ["--ray-replica-resource", host]
    log_dir = tmp_path_factory.mktemp("ray-autoscale")
    server = start_ingress(ray_node, log_dir, args, replicas=1, registry_files=[FIXTURES / "ray_overlay.yaml"])
    yield server
    server.stop()


def wait_for_replicas(server: RunningServer, count: int) -> None:
    deadline = time.monotonic() + DEADLINE_SECONDS
    while len(cluster_view(server)["replicas"]) != count:
        assert time.monotonic() < deadline, cluster_view(server)
        time.sleep(0.5)


def test_a_queue_adds_a_replica_and_idleness_removes_it(ingress: RunningServer) -> None:
    assert len(cluster_view(ingress)["replicas"]) == 1
    body = {
        "model": MODEL,
        "prompt": "Hello",
        "model_parameters": {"temperature": 0, "max_tokens": TOKENS, "stop_sequences": ["never-xyz"]},
    }

    def complete(_: int) -> int:
        with ingress.client(timeout=1800) as http:
            return http.post("/v4/completions", json=body).status_code

    with ThreadPoolExecutor(BURST) as pool:
        statuses = pool.map(complete, range(BURST))
        wait_for_replicas(ingress, 2)  # up, while the burst waits
        assert list(statuses) == [200] * BURST
    wait_for_replicas(ingress, 1)  # down, once nothing waits and the new replica holds nothing
    log = ingress.log()
    assert "starting one more" in log
    assert "holds no model and serves nothing: stopping it" in log


def test_requests_without_a_token_survive_their_replica(ingress: RunningServer) -> None:
    # After the test above, one replica holds the model; one request runs there (not
    # streaming: nothing reaches the client before the end) and two wait in the ingress.
    (replica,) = cluster_view(ingress)["replicas"]
    assert replica["models"] == {MODEL: "ready"}
    body = {
        "model": MODEL,
        "prompt": "Hello",
        "model_parameters": {"temperature": 0, "max_tokens": TOKENS, "stop_sequences": ["never-xyz"]},
    }

    def complete(_: int) -> tuple[int, str | None]:
        with ingress.client(timeout=1800) as http:
            response = http.post("/v4/completions", json=body)
            return response.status_code, response.headers.get("x-v4serve-replica")

    with ThreadPoolExecutor(3) as pool:
        answers = pool.map(complete, range(3))
        deadline = time.monotonic() + DEADLINE_SECONDS
        while (state := model_state(ingress))[:2] != (1, 2):
            assert time.monotonic() < deadline, state
            time.sleep(0.2)
        os.kill(replica["pid"], signal.SIGKILL)
        answers = list(answers)
    # Each was sent again to the replica the model moved to, and answered there.
    assert [status for status, _ in answers] == [200, 200, 200]
    (new_home,) = {name for _, name in answers}
    assert new_home != replica["name"]
    assert f"replica {replica['name']} is gone" in ingress.log()


def model_state(server: RunningServer) -> tuple[int, int]:
    """(running, queued) requests of MODEL in the ingress."""
    with server.client() as http:
        models = {m["id"]: m for m in http.get("/v4/models").json()["models"]}
    return models[MODEL]["running_requests"], models[MODEL]["queued_requests"]
