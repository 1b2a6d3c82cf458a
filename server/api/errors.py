"""Every failure becomes ``{"error": {message, type, param, code}}`` with its status.

One table for the whole server, as in vLLM's ``exception_handling``: routes raise, these
handlers answer. A caller never sees a stack trace, and the server keeps serving.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.errors import ServingError
from server.protocol.v4 import ErrorResponse
from server.service.error_bodies import error_body, serving_error_body, v4_validation_error

__all__ = ["error_body", "error_response", "error_responses", "install_error_handlers", "serving_error_body"]

logger = logging.getLogger(__name__)

# What each status a route may fail with means: the OpenAPI schema's side of the table
# (``error_responses``). Every one of them carries an ``ErrorResponse`` body.
ERROR_DESCRIPTIONS: dict[int, str] = {
    400: "The body is not JSON, or the model refuses the request (a prompt too long for it, images for a text model)",
    401: "No API key, or one the server does not know",
    404: "No model or alias of that name in the registry",
    413: "The body is larger than the server's limit",
    422: "A field fails validation; `param` names it",
    429: "The model is at its running and queued limits",
    500: "The engine or the server failed while serving the request",
    503: "The model cannot serve now: it is loading, it failed (and is retried after a back-off), or the server is shutting down",
}
_RETRY_AFTER = {
    "Retry-After": {"description": "Seconds to wait before trying again", "schema": {"type": "integer", "minimum": 1}}
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """A route's ``responses=`` for the error ``statuses`` it may answer with (see
    ``ERROR_DESCRIPTIONS``), so its OpenAPI schema shows their ``ErrorResponse`` body."""
    responses: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        response: dict[str, Any] = {"model": ErrorResponse, "description": ERROR_DESCRIPTIONS[status]}
        if status in (429, 503):
            response["headers"] = _RETRY_AFTER
        responses[status] = response
    return responses


def error_response(exc: ServingError, headers: dict[str, str] | None = None) -> JSONResponse:
    """The response for ``exc``; ASGI middleware that answers before routing uses it too,
    so a 401 or 413 sent from there looks exactly like one a route raised."""
    headers = dict(headers or {})
    if exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(exc.retry_after)))
    return JSONResponse(serving_error_body(exc), exc.status_code, headers=headers or None)


async def _serving_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServingError)
    return error_response(exc)


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    status, body = v4_validation_error(exc.errors())
    return JSONResponse(body, status)


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return JSONResponse(
        error_body(str(exc.detail), "http_error", exc.status_code), exc.status_code, headers=exc.headers
    )


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    # The path is the caller's, percent-decoded: %r escapes the control characters it may
    # hold (a terminal escape, say). The body says nothing of the exception, which may
    # name internals.
    logger.exception("unhandled error serving %s %r", request.method, request.url.path)
    return JSONResponse(error_body("internal server error", "internal_error", 500), 500)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ServingError, _serving_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
