"""``POST /v1/completions``, ``POST /v1/chat/completions`` and ``GET /v1/models``.

Routes only translate between HTTP and the service: the OpenAI request becomes the
service's ``GenerationRequest`` (``server.service.openai``), which takes the same path
as a ``/v4`` request (model lookup, images, admission, engine), and the results are
shaped back into OpenAI's responses there. Errors are the server's one JSON shape,
``{"error": {"message", "type", "param", "code"}}``; a request body that fails
validation is a 400 here, as in OpenAI's and vLLM's APIs (the ``/v4`` routes answer 422).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

from server.api.auth import Caller, current_caller
from server.api.errors import error_responses
from server.api.openai.sse import openai_events
from server.api.state import State
from server.api.streaming import EventStreamResponse, cancel_on_disconnect
from server.protocol import openai as oa
from server.service import GenerationResult, PendingGeneration
from server.service import openai as service_openai
from server.service.error_bodies import openai_validation_error

# nginx's "client closed request": the caller left before the answer was ready.
CLIENT_CLOSED_REQUEST = 499
# What /v1/models says of every model: who serves it, and since when.
OWNED_BY = "v4serve"
STARTED = int(time.time())


class OpenAIRoute(APIRoute):
    """A route whose request validation errors are 400s, as OpenAI's API answers them."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                return validation_error(exc)

        return route


def validation_error(exc: RequestValidationError) -> JSONResponse:
    status, body = openai_validation_error(exc.errors())
    return JSONResponse(body, status)


router = APIRouter(route_class=OpenAIRoute)


def _stream_responses(schema: str) -> dict[int | str, dict[str, Any]]:
    return {
        200: {
            "description": (
                f"The {schema}. With `stream: true`, server-sent events instead: each `data:` line holds a "
                "chunk as JSON, with `stream_options.include_usage` a last chunk with `choices: []` and the "
                "usage, then `data: [DONE]`; a failure after the first event is sent as "
                '`data: {"error": ...}` before `[DONE]`.'
            ),
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
        **error_responses(400, 401, 404, 413, 429, 500, 503),
    }


@router.post("/v1/completions", response_model=oa.TextCompletionResponse, responses=_stream_responses("completion"))
async def create_completion(
    body: oa.TextCompletionRequest, request: Request, caller: Annotated[Caller, Depends(current_caller)], state: State
) -> Response:
    generation = service_openai.completion_generation(body)
    pending = await state.service.prepare_generation(generation, caller.usage_account(None))
    if body.stream:
        return EventStreamResponse(
            openai_events(service_openai.completion_chunks(pending, body)), on_close=pending.close
        )
    return await _answer(request, pending, lambda result: service_openai.completion_response(pending, result))


@router.post(
    "/v1/chat/completions", response_model=oa.ChatCompletionResponse, responses=_stream_responses("chat completion")
)
async def create_chat_completion(
    body: oa.ChatCompletionRequest, request: Request, caller: Annotated[Caller, Depends(current_caller)], state: State
) -> Response:
    generation = service_openai.chat_generation(body)
    pending = await state.service.prepare_generation(generation, caller.usage_account(None))
    if body.stream:
        return EventStreamResponse(openai_events(service_openai.chat_chunks(pending, body)), on_close=pending.close)
    return await _answer(request, pending, lambda result: service_openai.chat_response(pending, result, body))


async def _answer(
    request: Request,
    pending: PendingGeneration,
    shape: Callable[[GenerationResult], oa.TextCompletionResponse | oa.ChatCompletionResponse],
) -> Response:
    try:
        result = await cancel_on_disconnect(request, pending.result())
    finally:
        pending.close()
    if result is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    return Response(shape(result).model_dump_json(), media_type="application/json")


@router.get(
    "/v1/models",
    response_model=oa.ModelCardList,
    responses=error_responses(401),
    dependencies=[Depends(current_caller)],
)
async def list_models(state: State) -> oa.ModelCardList:
    """Every registered model ID, each followed by its aliases, in OpenAI's shape."""
    cards = []
    for status in state.pool.status():
        for name in (status.model_id, *status.aliases):
            cards.append(oa.ModelCard(id=name, created=STARTED, owned_by=OWNED_BY))
    return oa.ModelCardList(data=cards)
