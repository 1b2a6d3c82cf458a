"""The ops stack (docker/compose.yaml, Prometheus, Grafana) checked without Docker.

This machine has no Docker engine, so the stack is not started here. What can be wrong
in it without one is checked: every file parses, every file the compose file mounts or
builds from exists, Prometheus scrapes the path the server serves metrics on with a key
the server accepts, Grafana's provisioning points where the dashboard is mounted, and
every PromQL query of the dashboard names only metrics the server exports. The exported
names come from the server itself: the real application's ``/metrics``, in process.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from server.api.auth import KeyRing, presented_key
from server.api.operations import METRICS_PATH
from server.settings import options
from tests.in_process import serve_in_process

DOCKER = Path(__file__).resolve().parents[1] / "docker"
COMPOSE = DOCKER / "compose.yaml"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "v4serve.json"
SAMPLE_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gauge": ("",),
}
# A PromQL identifier that names one of the server's series.
SERIES = re.compile(r"\bv4serve_[a-zA-Z0-9_:]*")


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_yaml(COMPOSE)


async def exported_series(tmp_path: Path) -> set[str]:
    """Every series name the server's /metrics can hold, from its families' types."""
    async with serve_in_process(tmp_path) as server, server.client() as http:
        response = await http.get(METRICS_PATH)
    assert response.status_code == 200, response.text
    names = set()
    for family in text_string_to_metric_families(response.text):
        suffixes = SAMPLE_SUFFIXES.get(family.type)
        assert suffixes is not None, f"{family.name}: a {family.type} metric; add its sample suffixes here"
        names.update(family.name + suffix for suffix in suffixes)
    return names


def dashboard_queries(dashboard: dict[str, Any]) -> list[str]:
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    queries += [variable["definition"] for variable in dashboard["templating"]["list"]]
    return queries


async def test_every_dashboard_query_names_only_metrics_the_server_exports(tmp_path: Path) -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    exported = await exported_series(tmp_path)
    queries = dashboard_queries(dashboard)
    assert len(queries) >= 10
    for query in queries:
        named = SERIES.findall(query)
        assert named, f"query names no v4serve metric: {query}"
        unknown = sorted(set(named) - exported)
        assert not unknown, f"{query}: the server exports no {', '.join(unknown)}"
    # What the issue asks the dashboard to show, each by the metric that measures it.
    everything = " ".join(queries)
    for metric in (
        "v4serve_requests_total",
        "v4serve_generation_tokens_total",
        "v4serve_time_to_first_token_seconds_bucket",
        "v4serve_queued_requests",
        "v4serve_model_state",
        "v4serve_memory_reserved_bytes",
    ):
        assert metric in everything


def test_the_dashboard_is_one_grafana_can_provision() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    datasource = load_yaml(DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yaml")
    uids = {source["uid"] for source in datasource["datasources"]}
    panels = dashboard["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels)
    for panel in panels:
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"]), panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] in uids, panel["title"]
            assert all(target["datasource"]["uid"] in uids for target in panel["targets"])
    assert dashboard["uid"] == "v4serve"


def test_compose_builds_and_mounts_only_files_that_exist(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"v4serve", "v4serve-gpu", "prometheus", "grafana"}
    for name, service in services.items():
        build = service.get("build")
        if build is not None:
            context = (DOCKER / build["context"]).resolve()
            assert (context / build["dockerfile"]).is_file(), name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DOCKER / source).exists(), f"{name}: {source}"
            else:
                assert source in compose["volumes"], f"{name}: volume {source} is not declared"
        for secret in service.get("secrets", []):
            assert (DOCKER / compose["secrets"][secret]["file"]).is_file(), f"{name}: secret {secret}"


def test_the_cpu_image_serves_by_default_and_the_gpu_profile_reserves_gpus(compose: dict[str, Any]) -> None:
    services = compose["services"]
    env_file = dict(
        line.split("=", 1) for line in (DOCKER / ".env").read_text().splitlines() if line and not line.startswith("#")
    )
    assert env_file["COMPOSE_PROFILES"] == "cpu"
    assert services["v4serve"]["profiles"] == ["cpu"]
    assert services["v4serve"]["build"]["dockerfile"] == "docker/Dockerfile.cpu"
    gpu = services["v4serve-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["build"]["dockerfile"] == "docker/Dockerfile"
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert (device["driver"], device["capabilities"]) == ("nvidia", ["gpu"])
    # Prometheus reaches either one under one name.
    assert "v4serve" in gpu["networks"]["default"]["aliases"]
    # Both take the same settings, each a real one of the server's.
    known = {option.env for option in options()}
    for name in ("v4serve", "v4serve-gpu"):
        assert set(services[name]["environment"]) <= known
        assert all(port.startswith("127.0.0.1:") for port in services[name]["ports"])


def test_prometheus_scrapes_the_metrics_path_with_a_key_the_server_accepts(compose: dict[str, Any]) -> None:
    config = load_yaml(DOCKER / "prometheus" / "prometheus.yml")
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == METRICS_PATH
    assert job["static_configs"][0]["targets"] == ["v4serve:8000"]
    prometheus = compose["services"]["prometheus"]
    assert any(volume.startswith("./prometheus/prometheus.yml:/etc/prometheus/") for volume in prometheus["volumes"])
    # The bearer credential is the compose secret Prometheus is given.
    authorization = job["authorization"]
    assert authorization["type"] == "Bearer"
    secret = authorization["credentials_file"].removeprefix("/run/secrets/")
    assert secret in prometheus["secrets"]
    key = (DOCKER / compose["secrets"][secret]["file"]).read_text().strip()
    # The server's keys file is the compose secret named by V4SERVE_API_KEYS_FILE.
    server = compose["services"]["v4serve"]
    keys_secret = server["environment"]["V4SERVE_API_KEYS_FILE"].removeprefix("/run/secrets/")
    assert keys_secret in server["secrets"]
    keys = KeyRing.from_sources("", DOCKER / compose["secrets"][keys_secret]["file"])
    assert keys.match(presented_key([(b"authorization", f"Bearer {key}".encode())])) is not None


def test_grafana_provisions_the_datasource_and_the_mounted_dashboards(compose: dict[str, Any]) -> None:
    grafana = compose["services"]["grafana"]
    mounts = dict(volume.split(":")[:2] for volume in grafana["volumes"])
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    providers = load_yaml(DOCKER / "grafana" / "provisioning" / "dashboards" / "v4serve.yaml")["providers"]
    assert providers[0]["options"]["path"] == mounts["./grafana/dashboards"]
    datasource = load_yaml(DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yaml")
    (source,) = datasource["datasources"]
    assert source["url"] == "http://prometheus:9090"
    assert "9090" in compose["services"]["prometheus"]["ports"][0]
