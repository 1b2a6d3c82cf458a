"""Joining a Ray cluster and placing engine hosts on it: shared by the batch job on Ray
(``server.batch.ray_job``) and the serving ingress (``server.cluster``).

An engine host is a Ray actor holding one engine pool, on one node or GPU set. Hosts are
placed by the operator's custom resources (``--ray-replica-resource``: one host per name,
each taking one unit), or else by the GPUs each takes (``--ray-replica-gpus``). Only the
``--ray`` paths import this module: a single machine never imports Ray.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from server.settings import Settings

# The Ray namespace v4serve's actors live in.
NAMESPACE = "v4serve"
# How long the head's address may take to accept a connection.
CONNECT_TIMEOUT_SECONDS = 10.0


def connect(address: str) -> None:
    """Join the Ray cluster at ``address`` (``auto``: the one this machine belongs to).

    A ``HOST:PORT`` nothing answers at is refused at once with ``ConnectionError`` (an
    ``OSError``, which the command line reports): Ray itself would retry for minutes.
    """
    if ray.is_initialized():
        return
    host, _, port = address.rpartition(":")
    if host and port.isdigit():
        try:
            socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_SECONDS).close()
        except OSError as exc:
            raise ConnectionError(f"no Ray cluster answers at {address} ({exc})") from exc
    ray.init(address=address, namespace=NAMESPACE, logging_level=logging.WARNING)


@dataclass(frozen=True, slots=True)
class Placement:
    """Where one host goes: a custom resource it takes a unit of, or a node it is pinned to."""

    name: str
    resource: str | None = None
    node_id: str | None = None


def actor_options(settings: Settings, placement: Placement | None) -> dict[str, Any]:
    """``.options()`` of a host actor: its GPUs and where it goes (spread over the nodes
    when ``placement`` is None). Hosts are never restarted by Ray: a lost host's work is
    given to another by its owner, which knows what was done."""
    options: dict[str, Any] = {
        "num_cpus": 0,
        "num_gpus": settings.ray_replica_gpus,
        "max_restarts": 0,
        # Requests (or batch lines) run concurrently through one async actor.
        "max_concurrency": 10_000,
    }
    if placement is not None and placement.resource is not None:
        options["resources"] = {placement.resource: 1}
    elif placement is not None and placement.node_id is not None:
        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(placement.node_id, soft=False)
    else:
        options["scheduling_strategy"] = "SPREAD"
    return options


def placements(settings: Settings) -> list[Placement]:
    """One host per ``--ray-replica-resource`` name, else one per live node with the GPUs
    a host takes (every live node on a CPU cluster)."""
    if settings.ray_replica_resources:
        return [Placement(name, resource=name) for name in settings.ray_replica_resources]
    found = []
    for node in ray.nodes():  # type: ignore[no-untyped-call]  # Ray leaves it untyped
        gpus = float(node.get("Resources", {}).get("GPU", 0.0))
        if node.get("Alive") and gpus >= settings.ray_replica_gpus:
            found.append(Placement(f"node-{node['NodeID'][:8]}", node_id=node["NodeID"]))
    return found
