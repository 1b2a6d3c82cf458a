"""Server-sent events in the contract's framing, and aborting on disconnect.

Each event is ``data: <CompletionResponse JSON>``; there is no ``[DONE]`` sentinel
because the SDK parses every ``data:`` line as JSON. A failure after the first byte can
no longer change the status, so it is sent as an ``event: error``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from server.api.errors import error_body, serving_error_body
from server.errors import ServingError
from server.protocol.v4 import CompletionResponse

logger = logging.getLogger(__name__)
T = TypeVar("T")


async def sse_events(chunks: AsyncIterator[CompletionResponse]) -> AsyncIterator[bytes]:
    try:
        async for chunk in chunks:
            yield b"data: " + chunk.model_dump_json().encode() + b"\n\n"
    except ServingError as exc:
        yield _error_event(serving_error_body(exc))
    except Exception:
        logger.exception("stream failed after it began")
        yield _error_event(error_body("internal server error", "internal_error", 500))
    finally:
        await _close(chunks)


def _error_event(body: dict) -> bytes:
    return b"event: error\ndata: " + json.dumps(body).encode() + b"\n\n"


async def _close(iterator: AsyncIterator[object]) -> None:
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        await aclose()


class EventStreamResponse(StreamingResponse):
    """A stream that stops generating as soon as the client goes away.

    Starlette only notices a disconnect on ASGI 2.4 servers when the next send fails;
    listening for ``http.disconnect`` alongside the stream and closing the iterator
    at once makes the engine abort deterministically, whatever the server.
    """

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes], *, on_close: Callable[[], None]):
        super().__init__(content)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        stream = asyncio.ensure_future(self.stream_response(send))
        disconnect = asyncio.ensure_future(self.listen_for_disconnect(receive))
        try:
            await asyncio.wait({stream, disconnect}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (stream, disconnect):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await stream
            await _close(self.body_iterator)
            self._on_close()


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T | None:
    """Run ``work`` unless the client disconnects first; ``None`` if it did.

    Cancelling the task that iterates the engine's generator aborts the engine request,
    so a non-streaming caller that gives up frees its batch slot too.
    """
    task = asyncio.ensure_future(work)

    async def wait_for_disconnect() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(wait_for_disconnect())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    return None if task.cancelled() else task.result()
