"""Building the FastAPI application around one engine pool."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping

from fastapi import FastAPI

from server import __version__
from server.api.admin import install_admin
from server.api.auth import ApiKeyAuth, KeyRing
from server.api.errors import install_error_handlers
from server.api.limits import BodySizeLimit
from server.api.observe import RequestObserver
from server.api.openai import router as openai_router
from server.api.operations import METRICS_PATH
from server.api.operations import router as operations_router
from server.api.routes import router
from server.api.state import STATE_ATTRIBUTE, AppState
from server.batch.endpoints import Endpoints
from server.batch.manager import BatchManager
from server.batch.store import BatchStore
from server.pool import EnginePool, EngineStarter
from server.registry import Registry
from server.service import CompletionService, ImagePolicy
from server.service.chat import ChatCompletions
from server.service.stack import build_pool
from server.settings import Settings
from server.telemetry import Telemetry

__all__ = ["AppState", "create_app"]


def create_app(
    settings: Settings,
    registry: Registry,
    *,
    starters: Mapping[str, EngineStarter] | None = None,
    pool: EnginePool | None = None,
) -> FastAPI:
    """The application serving ``registry`` as ``settings`` say; routes reach what it
    builds as ``server.api.state.State``.

    ``starters`` replace the engine starters by engine kind (``vllm``, ``transformers``),
    as ``EnginePool`` takes them: tests start stand-in engines through them. By default
    the real engines start. ``pool`` replaces the pool itself: a Ray cluster's ingress
    (``server.cluster``) passes one whose engines are handles to models on its replicas.
    """
    for name in settings.preload:
        if name not in registry:
            raise ValueError(f"--preload {name}: no such model or alias in the registry")
    keys = KeyRing.from_sources(settings.api_keys, settings.api_keys_file)
    telemetry = Telemetry.from_settings(settings)
    pool = pool or build_pool(settings, registry, starters=starters)
    service = CompletionService(pool, ImagePolicy.from_settings(settings))
    state = AppState(
        pool=pool,
        service=service,
        chat=ChatCompletions(service, pool, settings.home),
        keys=keys,
        preload=pool.startup_models(settings.preload),
        telemetry=telemetry,
    )
    state.batches = batches = BatchManager(
        BatchStore(settings.batch_dir or settings.home / "batches"),
        pool,
        Endpoints(service, state.chat),
        max_running=settings.batch_max_running,
        telemetry=telemetry,
    )
    pool.report_to(telemetry)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # Pinned and preloaded models load in the background: /healthz answers at once,
        # /readyz once they are loaded.
        task = asyncio.create_task(pool.start(state.preload))
        state.background.add(task)
        task.add_done_callback(state.background.discard)
        # Batches a previous run left unfinished resume (server.batch.manager).
        batches.start()
        try:
            yield
        finally:
            # Before the engines go: a batch stopped here resumes at the next start.
            await batches.stop()
            for task in list(state.background):
                task.cancel()
            await state.chat.close()
            await pool.shutdown()
            await asyncio.to_thread(telemetry.close)

    app = FastAPI(title="v4serve", version=__version__, lifespan=lifespan)
    setattr(app.state, STATE_ATTRIBUTE, state)
    app.include_router(router)
    app.include_router(openai_router)
    app.include_router(operations_router)
    install_admin(app, settings, pool)
    install_error_handlers(app)
    # The middleware added last runs first: the key is checked before the body is counted,
    # so a caller without a key learns nothing of the limit and costs no body read.
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(ApiKeyAuth, keys=keys, open_paths=[METRICS_PATH] if settings.metrics_open else [])
    # Outermost: every response, a 401 or 413 included, carries the request's ID.
    app.add_middleware(RequestObserver, telemetry=telemetry)
    return app
