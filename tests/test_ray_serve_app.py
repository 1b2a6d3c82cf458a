"""The ingress as a Ray Serve application (``server.cluster.serve_app:build``), as the KubeRay
``RayService`` (docker/kuberay-rayservice.yaml) runs it: Serve's proxy on loopback in
front of the ingress deployment, which starts its engine replica as on ``--ray``.

A driver process deploys the application (``serve.run``), as KubeRay's operator does on
Kubernetes, and shuts Serve down when the test closes its input. It is a process of its
own because Ray reads its settings (``RAY_AUTH_MODE``) when first imported, and this test
process may have imported Ray already.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest

from server.testing import LOOPBACK, free_port, server_env
from tests.conftest import API_KEY, API_KEYS, FIXTURES, REPO, TEST_HOME
from tests.ray_cluster import RAY_ENV, RayNode

pytestmark = pytest.mark.slow

MODEL = "tiny-ray-mpt"
# The driver: deploy, say so, wait for the end of its input, shut Serve down.
DRIVER = """
import json, sys
import ray
from ray import serve
from server.cluster.serve_app import build
address, port, args = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
ray.init(address=address, namespace="v4serve")
serve.start(http_options={"host": "127.0.0.1", "port": port})
serve.run(build(args), name="v4serve", route_prefix="/")
print("deployed", flush=True)
sys.stdin.read()
serve.shutdown()
"""


@pytest.fixture(scope="module")
def serve_url(ray_node: RayNode) -> Iterator[str]:
    port = free_port()
    args = {
        "registry_files": [str(FIXTURES / "ray_overlay.yaml")],
        "home": str(TEST_HOME),
        "api_keys": API_KEYS,
        "ray_replica_resources": ["host_a"],
    }
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER, ray_node.address, str(port), json.dumps(args)],
        cwd=REPO,
        env={**server_env(), **RAY_ENV},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert driver.stdout is not None and driver.stdin is not None
        # The first line comes once the application is deployed (or the driver failed).
        assert driver.stdout.readline().strip() == "deployed", "the Serve driver failed; see its stderr above"
        yield f"http://{LOOPBACK}:{port}"
        driver.stdin.close()
        driver.wait(120)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()


def test_the_serve_application_answers_through_serves_proxy(serve_url: str) -> None:
    body = {"model": MODEL, "prompt": "Hello there", "model_parameters": {"temperature": 0, "max_tokens": 4}}
    with httpx.Client(base_url=serve_url, headers={"x-api-key": API_KEY}, timeout=600) as http:
        response = http.post("/v4/completions", json=body)
        assert response.status_code == 200, response.text
        assert response.headers["x-v4serve-replica"].startswith("host_a-")
        assert 1 <= response.json()["token_usage"]["completion"] <= 4
        with http.stream("POST", "/v4/completions", json={**body, "stream": True}) as stream:
            assert stream.status_code == 200
            lines = [line for line in stream.iter_lines() if line.startswith("data: ")]
        assert lines, "no events"
        assert http.post("/v4/completions", json={**body, "model": "nope"}).status_code == 404
    assert httpx.post(serve_url + "/v4/completions", json=body).status_code == 401
