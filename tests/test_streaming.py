"""The SSE layer on its own (``server.api.streaming``): framing, the last event sent with
the end of the body, pacing under load, and what happens to the engine's generator when
the stream ends or the client leaves. No server, no engine: chunks come from a plain
async generator that records how it ended.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from server.api import streaming
from server.api.streaming import EventStreamResponse, LastEvent, event_interval, sse_events
from server.errors import EngineError
from server.protocol.v4 import Completion, CompletionResponse, TokenUsage


def chunk(text: str, finish: str | None = None, completion_tokens: int = 0) -> CompletionResponse:
    usage = TokenUsage(prompt=3, completion=completion_tokens, total=3 + completion_tokens) if finish else None
    return CompletionResponse(completion=Completion(text=text, finish_reason=finish), token_usage=usage)


class Source:
    """An engine's chunks, one per ``step`` seconds, recording whether it ran to its end."""

    def __init__(self, texts: list[str], step: float = 0.0, fail_after: int | None = None):
        self.texts, self.step, self.fail_after = texts, step, fail_after
        self.finished = self.closed = False

    async def chunks(self) -> AsyncIterator[CompletionResponse]:
        try:
            for i, text in enumerate(self.texts):
                if self.fail_after is not None and i >= self.fail_after:
                    raise EngineError("the engine failed")
                await asyncio.sleep(self.step)
                last = i == len(self.texts) - 1
                yield chunk(text, "length" if last else None, i + 1)
            self.finished = True
        finally:
            self.closed = True


def data(frame: bytes) -> dict[str, Any]:
    assert frame.startswith(b"data: ") and frame.endswith(b"\n\n")
    return json.loads(frame[6:])


async def collect(frames: AsyncIterator[bytes]) -> list[bytes]:
    return [frame async for frame in frames]


@pytest.fixture
def streams_open(monkeypatch: pytest.MonkeyPatch):
    """Pretend ``n`` other streams are open, so pacing applies (or not)."""

    def set_open(n: int) -> None:
        monkeypatch.setattr(streaming, "_active_streams", n)

    return set_open


async def test_frames_skip_empty_chunks_and_end_with_a_last_event() -> None:
    source = Source(["a", "", "b", "", "c"])
    frames = await collect(sse_events(source.chunks()))
    assert [data(f)["completion"]["text"] for f in frames] == ["a", "b", "c"]
    assert [isinstance(f, LastEvent) for f in frames] == [False, False, True]
    assert data(frames[-1])["token_usage"] == {"prompt": 3, "completion": 5, "total": 8}
    assert source.finished, "the generator ran to its end: the request counts as finished"


async def test_failure_after_the_first_event_is_the_last_event() -> None:
    source = Source(["a", "b", "c"], fail_after=2)
    frames = await collect(sse_events(source.chunks()))
    assert frames[-1].startswith(b"event: error\n") and isinstance(frames[-1], LastEvent)
    assert [data(f)["completion"]["text"] for f in frames[:-1]] == ["a", "b"]


def test_event_interval_spreads_the_budget_over_the_open_streams() -> None:
    assert event_interval(1) == event_interval(streaming.PACE_FROM_STREAMS) == 0.0
    more = streaming.PACE_FROM_STREAMS + 28
    assert event_interval(more) == pytest.approx(more / streaming.EVENTS_PER_SECOND)
    assert event_interval(10**6) == streaming.MAX_EVENT_INTERVAL


# An interval no test could wait out: a stream that ends within GUARD_SECONDS ended because
# its generator did, not because a pause ran its course (whatever the machine's speed).
ENDLESS_INTERVAL = 3600.0
GUARD_SECONDS = 60.0


async def test_under_load_tokens_that_arrive_together_make_one_event(streams_open, monkeypatch) -> None:
    monkeypatch.setattr(streaming, "MAX_EVENT_INTERVAL", ENDLESS_INTERVAL)
    streams_open(10**7)  # pacing at its longest interval
    source = Source([f" t{i}" for i in range(40)], step=0.001)
    frames = await asyncio.wait_for(collect(sse_events(source.chunks())), GUARD_SECONDS)
    texts = [data(f)["completion"]["text"] for f in frames]
    assert "".join(texts) == "".join(f" t{i}" for i in range(40)), "nothing lost or reordered"
    assert texts[0] == " t0", "the first token is sent as soon as it comes"
    # Every token generated during the pause after it shares one event: generation is not
    # slowed by the pause (the reader drains the engine), and the pause ends with it.
    assert len(frames) == 2
    assert data(frames[-1])["completion"]["finish_reason"] == "length"
    assert data(frames[-1])["token_usage"]["completion"] == 40
    assert source.finished


async def test_the_last_event_is_not_held_for_the_interval(streams_open, monkeypatch) -> None:
    monkeypatch.setattr(streaming, "MAX_EVENT_INTERVAL", ENDLESS_INTERVAL)
    streams_open(10**7)
    source = Source(["a", "b", "c"], step=0.01)
    # Ends at all: the pause ends when the engine's generator does.
    frames = await asyncio.wait_for(collect(sse_events(source.chunks())), GUARD_SECONDS)
    assert "".join(data(f)["completion"]["text"] for f in frames) == "abc"
    assert isinstance(frames[-1], LastEvent)


async def test_a_few_streams_get_every_step(streams_open) -> None:
    streams_open(streaming.PACE_FROM_STREAMS - 1)  # this one makes PACE_FROM_STREAMS
    source = Source([f" t{i}" for i in range(10)], step=0.001)
    frames = await collect(sse_events(source.chunks()))
    assert len(frames) == 10


async def test_paced_reader_stops_the_generator_when_the_stream_is_closed(streams_open) -> None:
    streams_open(1000)
    source = Source([f" t{i}" for i in range(1000)], step=0.001)
    frames = sse_events(source.chunks())
    assert data(await anext(frames))["completion"]["text"] == " t0"
    await frames.aclose()  # the client went away
    assert source.closed and not source.finished


async def test_empty_chunks_cost_no_pause_before_the_first_token(streams_open, monkeypatch) -> None:
    # The tiny models' first steps often decode to nothing (an incomplete character): they
    # must not hold the first visible token back by an interval each.
    monkeypatch.setattr(streaming, "MAX_EVENT_INTERVAL", ENDLESS_INTERVAL)
    streams_open(10**7)
    source = Source(["", "", "", "a", "b"], step=0.001)
    frames = sse_events(source.chunks())
    first = await asyncio.wait_for(anext(frames), GUARD_SECONDS)
    assert data(first)["completion"]["text"] == "a"
    await frames.aclose()


async def asgi_messages(response: EventStreamResponse) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []
    never = asyncio.Event()

    async def receive() -> dict[str, Any]:
        await never.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"spec_version": "2.3"}, "method": "POST", "headers": []}
    await response(scope, receive, send)
    return sent


async def test_the_last_event_and_the_end_of_the_body_are_one_send() -> None:
    source = Source(["a", "b"])
    closed: list[bool] = []
    sent = await asgi_messages(EventStreamResponse(sse_events(source.chunks()), on_close=lambda: closed.append(True)))
    bodies = [m for m in sent if m["type"] == "http.response.body"]
    assert [m["more_body"] for m in bodies] == [True, False]
    assert data(bodies[-1]["body"])["completion"]["finish_reason"] == "length"
    assert closed == [True] and source.finished


async def test_the_server_reporting_its_own_end_as_a_disconnect_does_not_abort() -> None:
    # uvicorn answers ``receive()`` with http.disconnect once the response is complete;
    # the generator must still run to its end (finished, not aborted).
    source = Source(["a", "b"])
    done = asyncio.Event()

    async def receive() -> dict[str, Any]:
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body"):
            done.set()
            await asyncio.sleep(0.01)  # the listener runs before the stream drains

    response = EventStreamResponse(sse_events(source.chunks()), on_close=lambda: None)
    await response({"type": "http", "asgi": {"spec_version": "2.3"}, "method": "POST", "headers": []}, receive, send)
    assert source.finished


async def test_a_client_that_leaves_closes_the_generator() -> None:
    source = Source([f" t{i}" for i in range(10_000)], step=0.001)
    gone = asyncio.Event()
    sends = 0

    async def receive() -> dict[str, Any]:
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal sends
        sends += 1
        if sends == 5:
            gone.set()

    closed: list[bool] = []
    response = EventStreamResponse(sse_events(source.chunks()), on_close=lambda: closed.append(True))
    await asyncio.wait_for(response({"type": "http", "asgi": {"spec_version": "2.3"}}, receive, send), 10)
    assert source.closed and not source.finished
    assert closed == [True]
