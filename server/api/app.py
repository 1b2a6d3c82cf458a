"""Building the FastAPI application around one engine pool."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping

from fastapi import FastAPI

from server import __version__
from server.api.auth import ApiKeyAuth, KeyRing
from server.api.errors import install_error_handlers
from server.api.limits import BodySizeLimit
from server.api.openai import router as openai_router
from server.api.routes import router
from server.api.state import STATE_ATTRIBUTE, AppState
from server.pool import EnginePool, EngineStarter, discover_devices
from server.registry import Registry
from server.service import CompletionService, ImagePolicy
from server.service.chat import ChatCompletions
from server.settings import Settings

__all__ = ["AppState", "create_app"]


def create_app(
    settings: Settings, registry: Registry, *, starters: Mapping[str, EngineStarter] | None = None
) -> FastAPI:
    """The application serving ``registry`` as ``settings`` say; routes reach what it
    builds as ``server.api.state.State``.

    ``starters`` replace the engine starters by engine kind (``vllm``, ``transformers``),
    as ``EnginePool`` takes them: tests start stand-in engines through them. By default
    the real engines start.
    """
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
        starters=starters,
    )
    service = CompletionService(pool, ImagePolicy.from_settings(settings))
    state = AppState(
        pool=pool,
        service=service,
        chat=ChatCompletions(service, pool, settings.home),
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
            await state.chat.close()
            await pool.shutdown()

    app = FastAPI(title="v4serve", version=__version__, lifespan=lifespan)
    setattr(app.state, STATE_ATTRIBUTE, state)
    app.include_router(router)
    app.include_router(openai_router)
    install_error_handlers(app)
    # The middleware added last runs first: the key is checked before the body is counted,
    # so a caller without a key learns nothing of the limit and costs no body read.
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(ApiKeyAuth, keys=keys)
    return app
