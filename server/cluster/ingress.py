"""The ingress of ``v4serve serve --ray``: the one-machine application over remote engines.

The application is ``server.api.create_app``'s, every route, key check, body limit,
error and stream as on one machine, given a pool whose engines are ``RemoteEngine``
handles: admission (429 with ``Retry-After``) is decided here, for the whole cluster,
by each model's limits. The ingress adds a response header naming the replica that
served each request, the per-replica view of ``GET /v4/models`` and ``GET /v4/cluster``.

Replicas are Ray actors started by this process and owned by it: they stop with it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Sequence

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api import create_app
from server.batch.ray_hosts import connect
from server.cluster.remote_engine import RemoteEngine, served_by
from server.cluster.router import Router
from server.cluster.routes import install_cluster_routes
from server.engines.base import AdapterRef, Engine, LaunchOptions
from server.pool import ENGINE_STARTERS, EnginePool
from server.registry import ModelEntry, Registry
from server.settings import Settings

logger = logging.getLogger(__name__)

# The response header naming the replica that served a request.
REPLICA_HEADER = "x-v4serve-replica"


def create_cluster_app(settings: Settings, registry: Registry) -> FastAPI:
    """The application serving ``registry`` from replicas on the Ray cluster at
    ``settings.ray_address``, which this connects to."""
    assert settings.ray_address is not None, "--ray names the cluster"
    connect(settings.ray_address)
    pool: EnginePool | None = None

    def queued() -> int:
        return sum(status.queued for status in pool.status()) if pool is not None else 0

    router = Router(settings, registry, queued=queued)

    async def start_remote(
        model_id: str, entry: ModelEntry, weights: str, adapters: Sequence[AdapterRef], launch: LaunchOptions
    ) -> Engine:
        _, facts = await router.open(model_id)
        return RemoteEngine(model_id, router, facts)

    pool = EnginePool(
        registry,
        home=settings.home,
        # Memory, eviction and keep-alive are the replicas' business: they hold the engines.
        devices=None,
        load_timeout=settings.load_timeout,
        starters={kind: start_remote for kind in ENGINE_STARTERS},
        local_weights=False,
    )
    app = create_app(settings, registry, pool=pool)
    install_cluster_routes(app, router)
    app.add_middleware(ReplicaHeader)
    serve_app = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(application: FastAPI) -> AsyncIterator[None]:
        router.start()
        try:
            async with serve_app(application):
                yield
        finally:
            await router.shutdown()

    app.router.lifespan_context = lifespan
    return app


class ReplicaHeader:
    """ASGI middleware: the replica that served the request, in ``x-v4serve-replica``.

    A request that moved (its replica died before its first token) names the last one.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        replicas: list[str] = []
        token = served_by.set(replicas)

        async def send_named(message: Message) -> None:
            if message["type"] == "http.response.start" and replicas:
                headers = [*message.get("headers", []), (REPLICA_HEADER.encode(), replicas[-1].encode())]
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_named)
        finally:
            served_by.reset(token)
