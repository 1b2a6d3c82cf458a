"""Request IDs: one per HTTP request, taken from ``x-request-id`` when it is sane, else made.

The ID lives in a context variable for the whole request, so every log line written on
its behalf (``server.telemetry.logs``), its error bodies, its ledger record, its spans and
the engine's own request ID carry it, without being passed down every call.

An incoming ID that is too long or holds characters outside ``[A-Za-z0-9._:@/+=-]`` is
replaced by a fresh one rather than refused: a proxy's odd ID should not cost the caller
its request, and the response header tells it which ID the server used. Only that
charset reaches logs, so a caller cannot forge log lines or fields through it.
"""

from __future__ import annotations

import contextvars
import re
import uuid
from dataclasses import dataclass

HEADER = "x-request-id"
MAX_LENGTH = 128
_VALID = re.compile(rf"[A-Za-z0-9._:@/+=-]{{1,{MAX_LENGTH}}}")


@dataclass(frozen=True, slots=True)
class RequestId:
    value: str
    # True when the caller chose it: then it need not be unique, and the engine's ID gets
    # a suffix so two requests sent with the same ID cannot abort each other.
    supplied: bool


_current: contextvars.ContextVar[RequestId | None] = contextvars.ContextVar("v4serve_request_id", default=None)


def new_request_id() -> str:
    return uuid.uuid4().hex


def accept(presented: str | None) -> RequestId:
    """The ID of a request that presented ``presented`` (the header's value, or None)."""
    if presented is not None and _VALID.fullmatch(presented):
        return RequestId(presented, supplied=True)
    return RequestId(new_request_id(), supplied=False)


def is_valid(value: str) -> bool:
    return _VALID.fullmatch(value) is not None


def bind(request_id: RequestId) -> contextvars.Token[RequestId | None]:
    """Make ``request_id`` the current request's; ``unbind`` with the token at its end."""
    return _current.set(request_id)


def unbind(token: contextvars.Token[RequestId | None]) -> None:
    _current.reset(token)


def current_request_id() -> str | None:
    current = _current.get()
    return current.value if current is not None else None


def engine_request_id(prefix: str) -> str:
    """The ID an engine request of the current request gets (also the response's ``id``):
    ``PREFIX-ID``, plus a short random suffix when the caller chose the ID. Outside a
    request (a batch job, a test), a fresh one."""
    current = _current.get()
    if current is None:
        return f"{prefix}-{new_request_id()}"
    if current.supplied:
        return f"{prefix}-{current.value}-{uuid.uuid4().hex[:8]}"
    return f"{prefix}-{current.value}"
