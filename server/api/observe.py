"""The outermost middleware: each request's ID and telemetry, from first to last byte.

It takes the request's ID (``x-request-id`` if valid, else a new one) and makes it and
the request's ``RequestTelemetry`` current for everything below, puts the ID on the
response's headers (errors and streams included: it adds it to whatever response starts),
and ends the request's telemetry when the response does: metrics, span and, for a
generation request, its usage record, which is committed *before* the response's last
byte is sent (``server.telemetry.ledger``). An answer the client has in full is therefore
in the ledger whatever happens to the server next.

A failure no handler answered (it would reach Starlette's outermost error middleware,
outside this one, and go out without the header) is answered here with the server's usual
500 body, then re-raised for the server log.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.errors import error_body
from server.telemetry import Telemetry, request_ids, requests

_HEADER = request_ids.HEADER.encode("ascii")


class RequestObserver:
    def __init__(self, app: ASGIApp, telemetry: Telemetry):
        self.app = app
        self.telemetry = telemetry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        presented = next((value for name, value in scope.get("headers", ()) if name == _HEADER), None)
        request_id = request_ids.accept(presented.decode("latin-1") if presented is not None else None)
        id_token = request_ids.bind(request_id)
        request = self.telemetry.begin(request_id, scope["method"], scope["path"])
        request_token = requests.bind(request)
        header = (_HEADER, request_id.value.encode("ascii"))
        started = ended = False

        async def observed_send(message: Message) -> None:
            nonlocal started, ended
            if message["type"] == "http.response.start":
                started = True
                request.status = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), header]}
            elif message["type"] == "http.response.body" and not message.get("more_body", False) and not ended:
                ended = True
                # The record is committed before the client has the whole answer.
                await self.telemetry.end(request, completed=True)
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        except Exception:
            if not started:
                response = JSONResponse(error_body("internal server error", "internal_error", 500), 500)
                await response(scope, receive, observed_send)
            raise
        finally:
            if not ended:
                ended = True
                await self.telemetry.end(request, completed=False)
            request.detach()
            requests.unbind(request_token)
            request_ids.unbind(id_token)
