"""HTTP routes: the contract's endpoint, the model list, liveness and readiness.

Routes only translate between HTTP and the service; what a parameter means is decided
in ``server.service``, and who the caller is (and which account it may name) in
``server.api.auth``, where the key is known.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from server.api.auth import Caller, current_caller
from server.api.streaming import EventStreamResponse, cancel_on_disconnect, sse_events
from server.protocol.v4 import CompletionRequest, CompletionResponse
from server.weights import BUILTIN_PREFIX, local_dir

router = APIRouter()

# nginx's "client closed request": the caller left before the answer was ready.
CLIENT_CLOSED_REQUEST = 499


@router.post("/v4/completions", response_model=CompletionResponse)
async def create_completion(
    body: CompletionRequest, request: Request, caller: Annotated[Caller, Depends(current_caller)]
) -> Response:
    service = request.app.state.v4.service
    pending = await service.prepare(body, caller.usage_account(body.account_id))
    if body.stream:
        return EventStreamResponse(sse_events(pending.chunks()), on_close=pending.close)
    try:
        result = await cancel_on_disconnect(request, pending.result())
    finally:
        pending.close()
    if result is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    return Response(result.model_dump_json(), media_type="application/json")


@router.get("/v4/models", dependencies=[Depends(current_caller)])
async def list_models(request: Request) -> dict[str, Any]:
    pool = request.app.state.v4.pool
    return {
        "models": [
            {
                "id": s.model_id,
                "aliases": list(s.aliases),
                "source": public_source(s.source),
                "base": s.base,
                "adapter": public_source(s.adapter),
                "engine": s.engine,
                "state": s.state.value,
                "running_requests": s.running,
                "queued_requests": s.queued,
                "pinned": s.pinned,
                "memory_bytes": s.memory,
                "devices": s.devices,
                "idle_seconds": s.idle_seconds,
                "load_seconds": s.load_seconds,
                "error": s.error,
            }
            for s in pool.status()
        ]
    }


def public_source(source: str | None) -> str | None:
    """A registry source as callers may see it: a hub repo ID or ``builtin:NAME`` as
    written, a local directory by its last component only (``local:NAME``), so the
    model list does not map the server's filesystem for every key holder."""
    if source is None or source.startswith(BUILTIN_PREFIX):
        return source
    local = local_dir(source)
    return source if local is None else f"local:{local.name}"


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    state = request.app.state.v4
    ready = state.pool.is_ready(state.preload)
    body = {"status": "ready" if ready else "loading", "preload": list(state.preload)}
    return JSONResponse(body, status_code=200 if ready else 503)
