"""The admin API, and the registry reload that SIGHUP asks for."""

from __future__ import annotations

import asyncio
import logging
import signal
from types import FrameType

from fastapi import FastAPI

from server.api.admin.control import RegistryControl
from server.api.admin.routes import CONTROL_ATTRIBUTE, router
from server.api.state import state_of
from server.errors import ServingError
from server.pool import EnginePool
from server.registry.operator import operator_file
from server.settings import Settings

__all__ = ["RegistryControl", "install_admin", "reload_on_sighup"]

logger = logging.getLogger(__name__)


def install_admin(app: FastAPI, settings: Settings, pool: EnginePool) -> None:
    """Add the admin routes to ``app``, changing ``pool``'s registry and persisting the
    changes under ``settings.home``."""
    control = RegistryControl(pool, settings.registry_files, operator_file(settings.home))
    setattr(app.state, CONTROL_ATTRIBUTE, control)
    app.include_router(router)


def reload_on_sighup(app: FastAPI) -> None:
    """Reload the registry on SIGHUP, as ``POST /v4/admin/registry/reload`` does.

    A plain signal handler (uvicorn owns the event loop, and its own handlers cover only
    SIGINT and SIGTERM): it runs in the main thread, which is the loop's, and only hands
    the reload to the loop. Call it from the serving process's main thread.
    """

    def on_hangup(signum: int, frame: FrameType | None) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            logger.warning("SIGHUP before the server runs: the registry is read at start-up anyway")
            return
        loop.call_soon_threadsafe(_start_reload, app)

    signal.signal(signal.SIGHUP, on_hangup)


def _start_reload(app: FastAPI) -> None:
    control = getattr(app.state, CONTROL_ATTRIBUTE)
    assert isinstance(control, RegistryControl)

    async def reload() -> None:
        logger.info("SIGHUP: reloading the registry")
        try:
            await control.reload()
        except ServingError as exc:
            logger.error("registry reload refused; still serving the registry as it was: %s", exc.message)
        except Exception:
            logger.exception("registry reload failed; still serving the registry as it was")

    background = state_of(app).background
    task = asyncio.create_task(reload())
    background.add(task)
    task.add_done_callback(background.discard)
