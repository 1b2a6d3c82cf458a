"""The ingress as a Ray Serve application, for clusters that Ray Serve runs (KubeRay's
``RayService``, ``serve run``): ``import_path: server.cluster.serve_app:build``.

The application is the one ``v4serve serve --ray`` runs (``create_cluster_app``), built
inside one Serve replica, which then starts and owns the engine-pool replicas; Serve's
proxy only carries HTTP to it. One ingress replica, always: the router that keeps each
model on one engine replica lives in it, and two ingresses would each load every model.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.serve import Application, Deployment

from server.cluster.ingress import create_cluster_app
from server.registry import load_registry
from server.settings import Settings

DEPLOYMENT_NAME = "v4serve-ingress"


def settings_from(args: dict[str, Any]) -> Settings:
    """The ingress's settings: Serve's ``args`` by setting name over ``V4SERVE_*`` variables,
    on the cluster the Serve replica runs in."""
    return Settings(**{"ray_address": "auto", **args})


def build(args: dict[str, Any]) -> Application:
    """Serve's application builder (``args`` from the Serve config's ``args:``)."""
    settings = settings_from(args)

    def ingress_app() -> FastAPI:
        return create_cluster_app(settings, load_registry(settings.registry_files))

    deploy = serve.deployment(name=DEPLOYMENT_NAME, num_replicas=1, ray_actor_options={"num_cpus": 0})
    deployment: Deployment = deploy(serve.ingress(ingress_app)())
    application: Application = deployment.bind()
    return application
