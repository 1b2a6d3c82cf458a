"""Building the FastAPI application around one engine pool."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import FastAPI

from server import __version__
from server.api.auth import ApiKeyAuth, KeyRing
from server.api.errors import install_error_handlers
from server.api.limits import BodySizeLimit
from server.api.routes import router
from server.pool import EnginePool, discover_devices
from server.registry import Registry
from server.service import CompletionService, ImagePolicy
from server.settings import Settings


@dataclass
class AppState:
    """What routes reach through ``request.app.state.v4``: no module-level globals."""

    pool: EnginePool
    service: CompletionService
    keys: KeyRing
    preload: tuple[str, ...]
    background: set[asyncio.Task[None]] = field(default_factory=set)


def create_app(settings: Settings, registry: Registry) -> FastAPI:
    for name in settings.preload:
        if name not in registry:
            raise ValueError(f"--preload {name}: no such model or alias in the registry")
    keys = KeyRing.from_sources(settings.api_keys, settings.api_keys_file)
    pool = EnginePool(
        registry,
        home=settings.home,
        devices=discover_devices(settings.memory_budget),
        load_timeout=settings.load_timeout,
        keep_alive=settings.keep_alive,
        sleep_mode=settings.sleep_mode,
    )
    state = AppState(
        pool=pool,
        service=CompletionService(pool, ImagePolicy.from_settings(settings)),
        keys=keys,
        preload=pool.startup_models(settings.preload),
    )

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # Pinned and preloaded models load in the background: /healthz answers at once,
        # /readyz once they are loaded.
        task = asyncio.create_task(pool.start(state.preload))
        state.background.add(task)
        task.add_done_callback(state.background.discard)
        try:
            yield
        finally:
            for task in list(state.background):
                task.cancel()
            await pool.shutdown()

    app = FastAPI(title="v4serve", version=__version__, lifespan=lifespan)
    app.state.v4 = state
    app.include_router(router)
    install_error_handlers(app)
    # The middleware added last runs first: the key is checked before the body is counted,
    # so a caller without a key learns nothing of the limit and costs no body read.
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(ApiKeyAuth, keys=keys)
    return app
