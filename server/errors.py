"""Errors every layer may raise, each carrying the HTTP status it deserves.

Engines, the pool and the service raise these; only the HTTP layer turns them into
responses (``server.api.errors``). Keeping the status on the exception, as vLLM's
``GracefulHTTPError`` does, means the mapping lives in one table instead of in every
route, and lower layers never import FastAPI.
"""

from __future__ import annotations


class ServingError(Exception):
    status_code: int = 500
    error_type: str = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after = retry_after


class InvalidRequestError(ServingError):
    status_code = 400
    error_type = "invalid_request_error"


class AuthenticationError(ServingError):
    status_code = 401
    error_type = "authentication_error"


class ModelNotFoundError(ServingError):
    status_code = 404
    error_type = "model_not_found"


class PayloadTooLargeError(ServingError):
    status_code = 413
    error_type = "payload_too_large"


class OverloadedError(ServingError):
    status_code = 429
    error_type = "overloaded"


class EngineError(ServingError):
    """The engine failed while serving a request that was itself valid."""

    status_code = 500
    error_type = "engine_error"


class UnavailableError(ServingError):
    """The model cannot serve right now (loading, failed, shutting down)."""

    status_code = 503
    error_type = "unavailable"
