"""The engine pool and the services over it, built from the settings: what the HTTP server
(``server.api.create_app``) and the batch command (``v4serve batch``) both run on."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from server.pool import EnginePool, EngineStarter, discover_devices
from server.registry import Registry
from server.service.chat import ChatCompletions
from server.service.completions import CompletionService
from server.service.images import ImagePolicy
from server.settings import Settings


@dataclass(frozen=True)
class ServiceStack:
    pool: EnginePool
    service: CompletionService
    chat: ChatCompletions

    async def close(self) -> None:
        """Stop the chat template renderer and every engine."""
        await self.chat.close()
        await self.pool.shutdown()


def build_stack(
    settings: Settings, registry: Registry, *, starters: Mapping[str, EngineStarter] | None = None
) -> ServiceStack:
    """The pool serving ``registry`` as ``settings`` say, and the services on it; nothing
    starts until a request (or ``pool.start``) asks for a model."""
    pool = build_pool(settings, registry, starters=starters)
    service = CompletionService(pool, ImagePolicy.from_settings(settings))
    return ServiceStack(pool, service, ChatCompletions(service, pool, settings.home))


def build_pool(
    settings: Settings, registry: Registry, *, starters: Mapping[str, EngineStarter] | None = None
) -> EnginePool:
    """The engine pool ``settings`` describe. ``starters`` replace the engine starters by
    engine kind, as ``EnginePool`` takes them (tests start stand-in engines with them)."""
    return EnginePool(
        registry,
        home=settings.home,
        devices=discover_devices(settings.memory_budget),
        load_timeout=settings.load_timeout,
        keep_alive=settings.keep_alive,
        sleep_mode=settings.sleep_mode,
        starters=starters,
    )
