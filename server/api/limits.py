"""Refusing oversized request bodies before they are read into memory."""

from __future__ import annotations

import contextlib

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.errors import error_response
from server.errors import PayloadTooLargeError


class _BodyTooLarge(Exception):
    """Raised into the app's ``receive`` once the 413 is sent, to stop its body read."""


class BodySizeLimit:
    """413 for a body over ``max_bytes``, by Content-Length or by counting a chunked body.

    A chunked body can only be measured as it arrives, inside the app's ``receive``. An
    exception raised there would reach FastAPI's body parsing, which turns any failure into
    400 "error parsing the body"; so the middleware sends the 413 itself, then stops the
    read and drops whatever the app still tries to answer.
    """

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self) -> PayloadTooLargeError:
        return PayloadTooLargeError(f"request body is larger than the server's limit of {self.max_bytes} bytes")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", ())).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await error_response(self._too_large())(scope, receive, send)
            return
        received = 0
        started = False
        answered = False

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if answered:
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        async def counting_receive() -> Message:
            nonlocal received, answered
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    if not started:
                        await error_response(self._too_large())(scope, receive, send)
                        answered = True
                    raise _BodyTooLarge
            return message

        # On _BodyTooLarge: answered 413 above; or the app had already begun its answer,
        # which is then cut short (the server closes a response left incomplete).
        with contextlib.suppress(_BodyTooLarge):
            await self.app(scope, counting_receive, guarded_send)
