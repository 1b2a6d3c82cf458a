"""A replica: one engine pool on one node (or GPU set) of a Ray cluster, as a Ray actor.

The pool is the single-machine one, unchanged: it loads models on demand within its
node's memory, evicts, restarts dead engines. The ingress reaches it through the methods
below, one per ``Engine`` method its ``RemoteEngine`` forwards, each naming the model.
Errors a request deserves (``ServingError``) cross to the ingress as they are raised.

The class is plain Python; the ingress makes it an actor (``ray.remote``) with the
resources that place it.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import os
import socket
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

from server.cluster.protocol import EngineFacts, ModelPlacement, ReplicaInfo
from server.engines.base import AdapterRef, Engine, GenerationDelta, LaunchOptions, PreparedRequest, SamplingOptions
from server.pool import ENGINE_STARTERS, EnginePool, EngineStarter, discover_devices
from server.registry import ModelEntry, Registry
from server.settings import Settings

if TYPE_CHECKING:
    import PIL.Image

logger = logging.getLogger(__name__)


class Replica:
    """An ``EnginePool`` served to the ingress; an async Ray actor once wrapped."""

    def __init__(self, name: str, settings: Settings, registry: Registry):
        logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self._name = name
        devices = discover_devices(settings.memory_budget)
        self._budget = sum(device.budget for device in devices)
        # Engine starts per model: the proof, for operators and tests, that a model stays
        # where it was loaded instead of being loaded again elsewhere.
        self._starts: collections.Counter[str] = collections.Counter()
        # The engine of each request being generated, by request ID, for ``abort``.
        self._requests: dict[str, Engine] = {}
        self._pool = EnginePool(
            registry,
            home=settings.home,
            devices=devices,
            load_timeout=settings.load_timeout,
            keep_alive=settings.keep_alive,
            sleep_mode=settings.sleep_mode,
            starters={kind: self._counted(starter) for kind, starter in ENGINE_STARTERS.items()},
        )

    def _counted(self, starter: EngineStarter) -> EngineStarter:
        async def start(
            model_id: str, entry: ModelEntry, weights: str, adapters: Sequence[AdapterRef], launch: LaunchOptions
        ) -> Engine:
            self._starts[model_id] += 1
            return await starter(model_id, entry, weights, adapters, launch)

        return start

    async def start(self) -> ReplicaInfo:
        """Start watching engines (keep-alive, deaths); the replica's first ``info``."""
        await self._pool.start(())
        return await self.info()

    async def info(self) -> ReplicaInfo:
        models: dict[str, ModelPlacement] = {}
        used = running = queued = 0
        for status in self._pool.status():
            if status.base is not None:
                continue  # an adapter shows its base's engine again
            models[status.model_id] = ModelPlacement(
                state=status.state.value,
                running=status.running,
                queued=status.queued,
                engine_starts=self._starts[status.model_id],
                memory=status.memory,
                devices=status.devices,
                error=status.error,
            )
            used += status.memory or 0
            running += status.running
            queued += status.queued
        return ReplicaInfo(
            name=self._name,
            pid=os.getpid(),
            node=socket.gethostname(),
            budget_bytes=self._budget,
            used_bytes=used,
            running=running,
            queued=queued,
            models=models,
        )

    async def load(self, model_id: str) -> EngineFacts:
        """Load ``model_id`` (no-op when loaded); what its handle needs to know."""
        lease = await self._pool.lease(model_id)
        try:
            engine = lease.engine
            return EngineFacts(max_model_len=engine.max_model_len, has_chat_template=engine.has_chat_template())
        finally:
            lease.release()

    async def prepare(
        self,
        model_id: str,
        prompt: str | Sequence[int],
        sampling: SamplingOptions,
        add_special_tokens: bool,
        adapter: str | None,
        images: Sequence[PIL.Image.Image],
    ) -> PreparedRequest:
        lease = await self._pool.lease(model_id)
        try:
            return await lease.engine.prepare(
                prompt, sampling, add_special_tokens=add_special_tokens, adapter=adapter, images=images
            )
        finally:
            lease.release()

    async def generate(
        self, model_id: str, request: PreparedRequest, request_id: str, stream: bool
    ) -> AsyncGenerator[GenerationDelta, None]:
        """The engine's deltas; cancelling the call (the ingress's client left) closes the
        engine's generator, which aborts the request in the engine."""
        lease = await self._pool.lease(model_id)
        self._requests[request_id] = lease.engine
        try:
            async with aclosing(lease.engine.generate(request, request_id, stream=stream)) as deltas:
                if stream:
                    async for chunk in coalesced(deltas):
                        yield chunk
                else:
                    # One delta at the end, whatever the engine gives: one Ray object
                    # instead of many, and until it comes nothing has reached the caller,
                    # so a replica lost meanwhile lets the ingress send the request again.
                    collected = [delta async for delta in deltas]
                    if collected:
                        yield merged(collected)
        finally:
            self._requests.pop(request_id, None)
            lease.release()

    async def abort(self, model_id: str, request_id: str) -> None:
        """Abort a request this replica is generating; one it does not know has ended."""
        engine = self._requests.get(request_id)
        if engine is not None and engine.model_id == model_id:
            await engine.abort(request_id)

    async def apply_chat_template(self, model_id: str, messages: Sequence[dict[str, Any]]) -> str:
        lease = await self._pool.lease(model_id)
        try:
            return await lease.engine.apply_chat_template(messages)
        finally:
            lease.release()

    async def decode(self, model_id: str, token_ids: Sequence[int]) -> str:
        lease = await self._pool.lease(model_id)
        try:
            return await lease.engine.decode(token_ids)
        finally:
            lease.release()

    async def shutdown(self) -> None:
        await self._pool.shutdown()


async def coalesced(deltas: AsyncIterator[GenerationDelta]) -> AsyncGenerator[GenerationDelta, None]:
    """``deltas`` as they come, those that arrived while the previous one was being sent
    merged into one: each costs a Ray object, so a stream sends fewer, larger deltas when
    the engine is faster than the way back (as vLLM's own output collector merges the
    outputs a slow reader has not taken yet); never later than one at a time."""
    waiting: asyncio.Queue[GenerationDelta | None] = asyncio.Queue()

    async def pump() -> None:
        try:
            async for delta in deltas:
                waiting.put_nowait(delta)
        finally:
            waiting.put_nowait(None)  # the end, or a failure ``pumping.result()`` raises

    pumping = asyncio.ensure_future(pump())
    try:
        ended = False
        while not ended:
            ready = [await waiting.get()]
            while not waiting.empty():
                ready.append(waiting.get_nowait())
            ended = ready[-1] is None
            chunk = [delta for delta in ready if delta is not None]
            if chunk:
                yield merged(chunk)
        pumping.result()
    finally:
        pumping.cancel()
        # The engine's generator is closed by its owner only once nothing iterates it.
        await asyncio.gather(pumping, return_exceptions=True)


def merged(deltas: Sequence[GenerationDelta]) -> GenerationDelta:
    """The deltas of one request as one: texts, tokens and log-probabilities joined, the
    counts and finish reason of the last."""
    last = deltas[-1]
    logprobs = [d.logprobs for d in deltas if d.logprobs is not None]
    prompt_logprobs = next((d.prompt_logprobs for d in deltas if d.prompt_logprobs is not None), None)
    return dataclasses.replace(
        last,
        text="".join(d.text for d in deltas),
        token_ids=tuple(token for d in deltas for token in d.token_ids),
        logprobs=tuple(entry for entries in logprobs for entry in entries) if logprobs else None,
        prompt_logprobs=prompt_logprobs,
    )
