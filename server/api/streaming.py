"""Server-sent events in the contract's framing, and aborting on disconnect.

Each event is ``data: <chunk JSON>`` (a ``CompletionResponse``, or a
``ChatCompletionsResponse`` for chat completions); there is no ``[DONE]`` sentinel because
the SDK parses every ``data:`` line as JSON, so a client knows the stream is over only
when the body ends. The final event (the one with ``finish_reason`` and the token
usage) therefore goes out in the same write as the end of the body: a client never waits
for the end after it has the last token, and its connection is free for the next request
at once. A failure after the first byte can no longer change the status, so it is sent as
an ``event: error``, which also ends the body.

Pacing. Every event costs the client a parse of its own: an HTTP chunk, a trip through
the client library's stream layers, a JSON decode. For ``httpx``-based clients (the SDKs)
that is 10-30 us of CPU per event, several times what aiohttp needs, and with many streams
in one client process the client, not the engine, becomes the bottleneck: it falls
behind, its next requests wait in its own event loop before they are even sent, and the
engine runs smaller batches. So while a process streams to more than
``PACE_FROM_STREAMS`` clients at once, each stream sends at most one event per
``event_interval()`` (the process's ``EVENTS_PER_SECOND`` shared among its streams, at
most ``MAX_EVENT_INTERVAL``), carrying every token generated since the last one: nothing
is held back from the engine, which vLLM's OpenAI server also does (its output collector
merges the tokens of a stream whose consumer is behind). The first event of a stream is
never delayed, nor is the last, and a stream alone, or one of a few, gets every engine
step as it comes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Generic, Protocol, TypeVar

from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from server.api.errors import error_body, serving_error_body
from server.errors import ServingError

logger = logging.getLogger(__name__)
T = TypeVar("T")


class StreamChunk(Protocol):
    """What ``sse_events`` needs of a chunk (``server.protocol.v4``'s completion and chat
    completion responses): the text it adds, whether it is the last (finish reason and
    usage), and a copy carrying other text (chunks merged into one event)."""

    def delta_text(self) -> str: ...

    def is_last(self) -> bool: ...

    def with_text(self, text: str) -> StreamChunk: ...

    def model_dump_json(self) -> str: ...


C = TypeVar("C", bound=StreamChunk)

# Pacing (see the module docstring). Up to this many concurrent streams every event goes
# out as soon as the engine produces it. Measured on two cores (docs/benchmarks.md), pacing
# made no difference that stood out of the rounds' noise at 32 streams or fewer, and helped
# the threaded SDK client at 128 (fewer, larger events; aiohttp lost about a tenth there).
PACE_FROM_STREAMS = 32
# Beyond it, the events per second this process sends, shared among its streams.
EVENTS_PER_SECOND = 2000.0
# The longest a stream waits between two events.
MAX_EVENT_INTERVAL = 0.05
# Paused streams resume on a common clock (multiples of their interval), so the process
# wakes once per interval for all of them instead of once per stream: every wakeup of the
# server can preempt a client that shares its CPU.
ALIGN_PAUSES = True

_active_streams = 0


def event_interval(active_streams: int) -> float:
    """Seconds a stream leaves between two events while ``active_streams`` are open."""
    if active_streams <= PACE_FROM_STREAMS:
        return 0.0
    return min(MAX_EVENT_INTERVAL, active_streams / EVENTS_PER_SECOND)


class LastEvent(bytes):
    """The stream's final frame: sent together with the end of the body."""


async def sse_events(chunks: AsyncIterator[C]) -> AsyncIterator[bytes]:
    """The SSE frames of ``chunks``; the final one is a ``LastEvent``.

    Under load a stream pauses for ``event_interval()`` after each event it sends, and the
    chunks that arrived meanwhile make its next event. A chunk with no text and no finish
    reason tells the client nothing (the detokenizer holds back an incomplete character)
    and is skipped, without a pause. After the final frame the iterator still runs
    ``chunks`` to its end, so the request ends as finished rather than as abandoned.
    """
    global _active_streams
    _active_streams += 1
    batches = _Batches(chunks)
    try:
        while (batch := await batches.next()) is not None:
            last: StreamChunk = batch[-1]
            if len(batch) > 1:
                # The last chunk's finish reason and usage, with the text of them all.
                last = last.with_text("".join(chunk.delta_text() for chunk in batch))
            if last.is_last():
                yield LastEvent(_frame(last))
            elif last.delta_text():
                yield _frame(last)
                interval = event_interval(_active_streams)
                if interval:
                    await batches.pause(interval)
    except ServingError as exc:
        yield LastEvent(_error_event(serving_error_body(exc)))
    except Exception:
        logger.exception("stream failed after it began")
        yield LastEvent(_error_event(error_body("internal server error", "internal_error", 500)))
    finally:
        _active_streams -= 1
        await batches.close()
        await _close(chunks)


class _Batches(Generic[T]):
    """An async iterator's items as lists: one at a time, as they come, until the stream
    first pauses; from then on a reader task drains the iterator as the engine produces
    (nothing waits on the client) and each ``next`` takes all that arrived since the last.
    """

    def __init__(self, items: AsyncIterator[T]):
        self._items = items
        self._reader: _Reader[T] | None = None

    async def next(self) -> list[T] | None:
        """The next batch (at least one item); ``None`` once the iterator has ended."""
        if self._reader is None:
            try:
                return [await anext(self._items)]
            except StopAsyncIteration:
                return None
        batch = await self._reader.take()
        if batch:
            return batch
        self._reader.raise_failure()
        return None

    async def pause(self, seconds: float) -> None:
        """Let items gather for ``seconds``, or until the iterator ends."""
        if self._reader is None:
            self._reader = _Reader(self._items)
        await self._reader.pause(seconds)

    async def close(self) -> None:
        if self._reader is not None:
            await self._reader.stop()


class _Reader(Generic[T]):
    """Drains an async iterator in a task of its own, for ``_Batches``."""

    def __init__(self, items: AsyncIterator[T]):
        self._items: list[T] = []
        self._failure: Exception | None = None
        self.finished = False
        self._on_item: asyncio.Future[None] | None = None
        self._on_finish: asyncio.Future[None] | None = None
        self._task = asyncio.ensure_future(self._run(items))

    async def _run(self, items: AsyncIterator[T]) -> None:
        try:
            async for item in items:
                self._items.append(item)
                _wake(self._on_item)
        except Exception as exc:  # the stream's to report; cancellation propagates
            self._failure = exc
        finally:
            self.finished = True
            _wake(self._on_item)
            _wake(self._on_finish)

    async def take(self) -> list[T]:
        """What has arrived, waiting for at least one item unless the iterator ended."""
        if not self._items and not self.finished:
            self._on_item = asyncio.get_running_loop().create_future()
            try:
                await self._on_item
            finally:
                self._on_item = None
        items, self._items = self._items, []
        return items

    async def pause(self, seconds: float) -> None:
        """Sleep until the next multiple of ``seconds`` on the loop's clock (or for
        ``seconds`` if pauses are not aligned), or until the iterator ends."""
        if self.finished:
            return
        loop = asyncio.get_running_loop()
        self._on_finish = loop.create_future()
        now = loop.time()
        deadline = (math.floor(now / seconds) + 1) * seconds if ALIGN_PAUSES else now + seconds
        timer = loop.call_at(deadline, _wake, self._on_finish)
        try:
            await self._on_finish
        finally:
            timer.cancel()
            self._on_finish = None

    def raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    async def stop(self) -> None:
        """Cancel the reader (which aborts the engine request if it was still running)."""
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


def _wake(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


def _frame(chunk: StreamChunk) -> bytes:
    return b"data: " + chunk.model_dump_json().encode() + b"\n\n"


def _error_event(body: dict[str, Any]) -> bytes:
    return b"event: error\ndata: " + json.dumps(body).encode() + b"\n\n"


async def _close(iterator: object) -> None:
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        await aclose()


class EventStreamResponse(StreamingResponse):
    """A stream that ends its body with its last event and stops generating as soon as
    the client goes away.

    Starlette only notices a disconnect on ASGI 2.4 servers when the next send fails;
    listening for ``http.disconnect`` alongside the stream and closing the iterator
    at once makes the engine abort deterministically, whatever the server.
    """

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes], *, on_close: Callable[[], None]):
        super().__init__(content)
        self._on_close = on_close
        self._body_complete = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        stream = asyncio.ensure_future(self.stream_response(send))
        disconnect = asyncio.ensure_future(self.listen_for_disconnect(receive))
        try:
            await asyncio.wait({stream, disconnect}, return_when=asyncio.FIRST_COMPLETED)
            if self._body_complete and not stream.done():
                # The server reports the end of its own response as a disconnect: the
                # client is still there, so the stream runs its generator to the end
                # (the request ends as finished, not aborted).
                await stream
        finally:
            for task in (stream, disconnect):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await stream
            await _close(self.body_iterator)
            self._on_close()

    async def stream_response(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        ended = False
        async for frame in self.body_iterator:
            if ended:
                logger.error("stream produced a frame after its last event; dropped")
                continue
            ended = isinstance(frame, LastEvent)
            body = frame.encode(self.charset) if isinstance(frame, str) else bytes(frame)
            self._body_complete = ended
            await send({"type": "http.response.body", "body": body, "more_body": not ended})
        if not ended:
            self._body_complete = True
            await send({"type": "http.response.body", "body": b"", "more_body": False})


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
