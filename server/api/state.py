"""What routes reach of the application, typed: ``State`` in a route's signature.

``create_app`` builds one ``AppState`` per application and keeps it on ``app.state``;
routes take it as a FastAPI dependency instead of reading ``request.app.state`` (typed
``Any``), so what they use of it is type-checked.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, FastAPI, Request

from server.api.auth import KeyRing
from server.batch.manager import BatchManager
from server.pool import EnginePool
from server.service import CompletionService
from server.service.chat import ChatCompletions
from server.telemetry import Telemetry

# The attribute of ``app.state`` that holds the ``AppState``.
STATE_ATTRIBUTE = "v4"


@dataclass
class AppState:
    """Everything a request may need beyond its own body: no module-level globals."""

    pool: EnginePool
    service: CompletionService
    chat: ChatCompletions
    keys: KeyRing
    preload: tuple[str, ...]
    # Metrics, usage ledger and tracing (server.telemetry).
    telemetry: Telemetry = field(default_factory=Telemetry)
    # The /v1/batches jobs (server.batch.manager); None where the application runs none.
    batches: BatchManager | None = None
    background: set[asyncio.Task[None]] = field(default_factory=set)


def state_of(app: FastAPI) -> AppState:
    """The ``AppState`` of an application ``create_app`` built."""
    state = getattr(app.state, STATE_ATTRIBUTE, None)
    if not isinstance(state, AppState):
        raise RuntimeError("this application was not built by server.api.create_app")
    return state


async def app_state(request: Request) -> AppState:
    """FastAPI dependency: the application's ``AppState``.

    A coroutine on purpose: FastAPI runs a plain function dependency in a worker thread,
    a thread hop per request for an attribute read.
    """
    return state_of(request.app)


State = Annotated[AppState, Depends(app_state)]
