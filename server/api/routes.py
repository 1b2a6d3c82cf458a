"""HTTP routes: the contract's endpoints, the model list, liveness and readiness.

Routes only translate between HTTP and the service; what a parameter means is decided
in ``server.service``, and who the caller is (and which account it may name) in
``server.api.auth``, where the key is known. What they need of the application comes
typed, as ``State`` (``server.api.state``); what they answer is declared in the OpenAPI
schema, error statuses included.
"""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from server.api.auth import Caller, current_caller
from server.api.errors import error_responses
from server.api.state import State
from server.api.streaming import EventStreamResponse, cancel_on_disconnect, sse_events
from server.pool import ModelStatus
from server.protocol.v4 import (
    ChatCompletionRequest,
    ChatCompletionsResponse,
    CompletionRequest,
    CompletionResponse,
    Health,
    ModelInfo,
    ModelList,
    Readiness,
    RequestModel,
)
from server.service import PendingCompletion
from server.service.chat import PendingChat
from server.weights import BUILTIN_PREFIX, local_dir

logger = logging.getLogger(__name__)

router = APIRouter()

# nginx's "client closed request": the caller left before the answer was ready.
CLIENT_CLOSED_REQUEST = 499
# A body full of unknown keys must not flood the log: this many names at most, each cut.
MAX_LOGGED_FIELDS = 20
MAX_LOGGED_NAME = 100

COMPLETION_RESPONSES = {
    200: {
        "description": (
            "The completion. With `stream: true`, server-sent events instead: each `data:` line "
            "holds a CompletionResponse as JSON, the last one with `finish_reason` and `token_usage`; "
            "a failure after the first event is sent as `event: error` with an ErrorResponse. "
            "The body ends after the last event (there is no `[DONE]`)."
        ),
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    },
    **error_responses(400, 401, 404, 413, 422, 429, 500, 503),
}


@router.post("/v4/completions", response_model=CompletionResponse, responses=COMPLETION_RESPONSES)
async def create_completion(
    body: CompletionRequest,
    request: Request,
    caller: Annotated[Caller, Depends(current_caller)],
    state: State,
) -> Response:
    log_ignored_fields(body, "POST /v4/completions")
    pending = await state.service.prepare(body, caller.usage_account(body.account_id))
    return await _answer(request, pending, stream=body.stream)


CHAT_COMPLETION_RESPONSES = {
    200: {
        "description": (
            "The assistant's reply. With `stream: true`, server-sent events instead: each `data:` line "
            "holds a ChatCompletionsResponse as JSON whose message content is the text since the previous "
            "event, the last one with `finish_reason` and `token_usage`; a failure after the first event is "
            "sent as `event: error` with an ErrorResponse. The body ends after the last event (there is no "
            "`[DONE]`)."
        ),
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    },
    **error_responses(400, 401, 404, 413, 422, 429, 500, 503),
}


@router.post("/v4/chat-completions", response_model=ChatCompletionsResponse, responses=CHAT_COMPLETION_RESPONSES)
async def create_chat_completion(
    body: ChatCompletionRequest,
    request: Request,
    caller: Annotated[Caller, Depends(current_caller)],
    state: State,
) -> Response:
    """The next message of a conversation: the model's chat template (or the request's own
    `chat_template`) renders the messages, and the model continues as `/v4/completions` does."""
    log_ignored_fields(body, "POST /v4/chat-completions")
    pending = await state.chat.prepare(body, caller.usage_account(body.account_id))
    return await _answer(request, pending, stream=body.stream)


async def _answer(request: Request, pending: PendingCompletion | PendingChat, *, stream: bool) -> Response:
    """A prepared v4 request's answer: server-sent events, or one JSON body unless the
    client leaves first (then 499, and the engine request is aborted)."""
    if stream:
        return EventStreamResponse(sse_events(pending.chunks()), on_close=pending.close)
    try:
        result = await cancel_on_disconnect(request, pending.result())
    finally:
        pending.close()
    if result is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    return Response(result.model_dump_json(), media_type="application/json")


def log_ignored_fields(body: RequestModel, route: str) -> None:
    """One line per request naming the fields the server ignored (``RequestModel``):
    names only, never values, each escaped (``repr``) as it is the caller's."""
    ignored = body.ignored_fields()
    if not ignored:
        return
    names = ", ".join(repr(name[:MAX_LOGGED_NAME]) for name in ignored[:MAX_LOGGED_FIELDS])
    more = f" and {len(ignored) - MAX_LOGGED_FIELDS} more" if len(ignored) > MAX_LOGGED_FIELDS else ""
    logger.warning("%s: ignored fields: %s%s", route, names, more)


@router.get(
    "/v4/models", response_model=ModelList, responses=error_responses(401), dependencies=[Depends(current_caller)]
)
async def list_models(state: State) -> ModelList:
    return ModelList(models=[model_info(status) for status in state.pool.status()])


def model_info(status: ModelStatus) -> ModelInfo:
    return ModelInfo(
        id=status.model_id,
        aliases=list(status.aliases),
        source=public_source(status.source),
        base=status.base,
        adapter=public_source(status.adapter),
        engine=status.engine,
        state=status.state.value,
        running_requests=status.running,
        queued_requests=status.queued,
        pinned=status.pinned,
        memory_bytes=status.memory,
        devices=status.devices,
        idle_seconds=status.idle_seconds,
        load_seconds=status.load_seconds,
        error=status.error,
    )


def public_source(source: str | None) -> str | None:
    """A registry source as callers may see it: a hub repo ID or ``builtin:NAME`` as
    written, a local directory by its last component only (``local:NAME``), so the
    model list does not map the server's filesystem for every key holder."""
    if source is None or source.startswith(BUILTIN_PREFIX):
        return source
    local = local_dir(source)
    return source if local is None else f"local:{local.name}"


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "The pinned or preloaded models are still loading"}},
)
async def readyz(state: State) -> JSONResponse:
    ready = state.pool.is_ready(state.preload)
    body = Readiness(status="ready" if ready else "loading", preload=list(state.preload))
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)
