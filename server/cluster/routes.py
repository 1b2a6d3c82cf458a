"""What the ingress adds to the application's routes: where each model is, per replica.

``GET /v4/models`` answers as on one machine, each model with two more fields: the
replica its requests go to, and its state on every replica that holds (or held) it.
``GET /v4/cluster`` lists the replicas themselves, for operators.
"""

from __future__ import annotations

from fastapi import Depends, FastAPI
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field

from server.api.auth import current_caller
from server.api.errors import error_responses
from server.api.routes import model_info
from server.api.state import State
from server.cluster.router import ReplicaHandle, Router
from server.protocol.v4 import ModelInfo


class ReplicaModel(BaseModel):
    """One model on one replica."""

    replica: str
    state: str = Field(description="not_loaded, loading, ready, sleeping or failed, on that replica")
    running_requests: int
    queued_requests: int
    engine_starts: int = Field(description="engines of this model the replica has started since it started")
    memory_bytes: int | None
    devices: str | None
    error: str | None


class ClusterModelInfo(ModelInfo):
    replica: str | None = Field(description="the replica this model's requests go to; null until its first request")
    replicas: list[ReplicaModel] = Field(description="the model on every live replica that holds or loaded it")


class ClusterModelList(BaseModel):
    models: list[ClusterModelInfo]


class ReplicaView(BaseModel):
    name: str
    ready: bool
    resource: str | None = Field(description="the custom Ray resource that placed it")
    pid: int | None
    node: str | None
    free_bytes: int | None
    running_requests: int | None
    queued_requests: int | None
    routed_requests: int = Field(description="calls the ingress has routed to it")
    loads: int = Field(description="model loads the ingress has asked of it")
    models: dict[str, str] = Field(description="model ID -> state, for every model it holds")


class ClusterView(BaseModel):
    replicas: list[ReplicaView]


def install_cluster_routes(app: FastAPI, router: Router) -> None:
    """Replace ``GET /v4/models`` with the per-replica view and add ``GET /v4/cluster``."""
    app.router.routes[:] = [
        route for route in app.router.routes if not (isinstance(route, APIRoute) and route.path == "/v4/models")
    ]
    guarded = [Depends(current_caller)]

    async def list_models(state: State) -> ClusterModelList:
        await router.refresh()
        models = []
        for status in state.pool.status():
            engine_model = status.base or status.model_id
            bound = router.bound(engine_model)
            models.append(
                ClusterModelInfo(
                    **model_info(status).model_dump(),
                    replica=bound.name if bound is not None and bound.alive else None,
                    replicas=[view for r in router.live if (view := _model_on(r, engine_model)) is not None],
                )
            )
        return ClusterModelList(models=models)

    async def cluster() -> ClusterView:
        await router.refresh()
        return ClusterView(replicas=[_replica_view(r) for r in router.live])

    responses = error_responses(401)
    app.add_api_route(
        "/v4/models",
        list_models,
        methods=["GET"],
        response_model=ClusterModelList,
        responses=responses,
        dependencies=guarded,
    )
    app.add_api_route(
        "/v4/cluster", cluster, methods=["GET"], response_model=ClusterView, responses=responses, dependencies=guarded
    )


def _model_on(replica: ReplicaHandle, model_id: str) -> ReplicaModel | None:
    placement = replica.info.models.get(model_id) if replica.info is not None else None
    if placement is None or (placement.state == "not_loaded" and placement.engine_starts == 0):
        return None
    return ReplicaModel(
        replica=replica.name,
        state=placement.state,
        running_requests=placement.running,
        queued_requests=placement.queued,
        engine_starts=placement.engine_starts,
        memory_bytes=placement.memory,
        devices=placement.devices,
        error=placement.error,
    )


def _replica_view(replica: ReplicaHandle) -> ReplicaView:
    info = replica.info
    return ReplicaView(
        name=replica.name,
        ready=replica.ready.is_set(),
        resource=replica.resource,
        pid=info.pid if info else None,
        node=info.node if info else None,
        free_bytes=info.free_bytes if info else None,
        running_requests=info.running if info else None,
        queued_requests=info.queued if info else None,
        routed_requests=replica.routed,
        loads=replica.loads,
        models={m: p.state for m, p in info.models.items() if p.state != "not_loaded"} if info else {},
    )
