"""Error bodies, ``{"error": {message, type, param, code}}``, for any way a request arrives.

The HTTP layer answers with them (``server.api.errors``, ``server.api.openai.routes``), and
the batch runner (``server.batch``) writes them into output lines: one table of what a
failure looks like, below both, so a request sent in a batch fails exactly as it would
over HTTP. Pure functions of the error: no FastAPI here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from server.errors import ServingError
from server.protocol.v4 import ErrorDetail, ErrorResponse
from server.telemetry import current_request_id

# pydantic's and FastAPI's validation errors, as ``ValidationError.errors()`` lists them.
FieldErrors = Sequence[Mapping[str, Any]]
# The labels pydantic gives the members of a union ("function-after[...]", "list[...]").
_UNION_LABEL = re.compile(r"[\[\]()-]")


def error_body(message: str, error_type: str, status: int, param: str | None = None) -> dict[str, Any]:
    """The body; while serving a request, its ``request_id`` too, for the caller to quote."""
    detail = ErrorDetail(message=message, type=error_type, param=param, code=status, request_id=current_request_id())
    body = ErrorResponse(error=detail).model_dump()
    if detail.request_id is None:
        del body["error"]["request_id"]
    return body


def serving_error_body(exc: ServingError) -> dict[str, Any]:
    return error_body(exc.message, exc.error_type, exc.status_code, exc.param)


def invalid_json_body(detail: str) -> dict[str, Any]:
    """400 for a body that is not JSON; ``detail`` says where the parser stopped."""
    return error_body(f"the request body is not valid JSON: {detail}".rstrip(": "), "invalid_json", 400, "body")


def v4_validation_error(errors: FieldErrors) -> tuple[int, dict[str, Any]]:
    """A ``/v4`` body that fails validation: 422 naming every bad field (400 for bad JSON)."""
    first = errors[0] if errors else {}
    if any(error.get("type") == "json_invalid" for error in errors):
        return 400, invalid_json_body(str(first.get("ctx", {}).get("error", "")))
    message = "; ".join(f"{_v4_field(error.get('loc', ()))}: {error.get('msg')}" for error in errors)
    return 422, error_body(message, "invalid_parameter", 422, _v4_field(first.get("loc", ())))


def openai_validation_error(errors: FieldErrors) -> tuple[int, dict[str, Any]]:
    """A ``/v1`` body that fails validation: 400, as OpenAI's and vLLM's APIs answer it."""
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return 400, invalid_json_body(str(first.get("ctx", {}).get("error", "")))
    messages = [f"{_openai_field(error.get('loc', ()))}: {_openai_message(error)}" for error in errors]
    return 400, error_body("; ".join(messages), "invalid_request_error", 400, _openai_field(first.get("loc", ())))


def _v4_field(loc: Any) -> str:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or "body"


def _openai_field(loc: Any) -> str:
    # Leaves out "body" and the labels of union members, which name no field of the request.
    parts = [str(part) for part in loc if part != "body" and not _UNION_LABEL.search(str(part))]
    return ".".join(parts) or "body"


def _openai_message(error: Mapping[str, Any]) -> str:
    if error.get("type") == "extra_forbidden":
        return "unknown field; this server does not implement it"
    return str(error.get("msg", "invalid"))
