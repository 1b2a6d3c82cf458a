"""The ingress's engine for a model: a handle that forwards to the replica holding it.

The ingress's ``EnginePool`` starts one ``RemoteEngine`` per model instead of a real
engine, so admission (429 with ``Retry-After``), the service and every route work as on
one machine. Each call goes to the replica the ``Router`` has bound the model to; when
that replica is gone, the call is made again after the router has bound the model to
another one (loading it there), as long as nothing has reached the client yet: a
request is retried until its first delta, a stream already under way ends with an error
(``event: error``).
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing, suppress
from typing import TYPE_CHECKING, Any

import ray
from ray.exceptions import RayActorError, RayTaskError

from server.cluster.protocol import EngineFacts
from server.cluster.router import ReplicaHandle, ReplicaLost, Router, unwrap
from server.engines.base import Engine, EngineStats, GenerationDelta, PreparedRequest, SamplingOptions
from server.errors import UnavailableError

if TYPE_CHECKING:
    import PIL.Image

logger = logging.getLogger(__name__)

# The replicas that served the current HTTP request, for its response header: a list
# the ingress's middleware puts here per request and reads when the response starts.
served_by: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("served_by", default=None)


class RemoteEngine(Engine):
    def __init__(self, model_id: str, router: Router, facts: EngineFacts):
        self.model_id = model_id
        self.max_model_len = facts.max_model_len
        self._facts = facts
        self._router = router
        self._running = 0

    async def _replica(self) -> ReplicaHandle:
        """The model's replica, binding (and loading) it anew if its replica is gone."""
        replica = self._router.bound(self.model_id)
        if replica is None or not replica.alive:
            replica, self._facts = await self._router.open(self.model_id)
        holder = served_by.get()
        if holder is not None:
            holder.append(replica.name)
        replica.routed += 1
        return replica

    def _attempts(self) -> int:
        """A call goes to each replica once at most, then gives up."""
        return max(1, len(self._router.replicas)) + 1

    async def _ask(self, method: str, *args: Any) -> Any:
        """The answer of the model's replica to ``method``; asked again of the replica the
        model is bound to next when that one is gone."""
        for _ in range(self._attempts()):
            replica = await self._replica()
            try:
                return await self._router.call(replica, getattr(replica.actor, method).remote(self.model_id, *args))
            except ReplicaLost:
                continue
        raise UnavailableError(f"no replica could take model '{self.model_id}'; retry later", retry_after=10)

    async def apply_chat_template(self, messages: Sequence[dict[str, Any]]) -> str:
        text: str = await self._ask("apply_chat_template", list(messages))
        return text

    def has_chat_template(self) -> bool:
        return self._facts.has_chat_template

    async def decode(self, token_ids: Sequence[int]) -> str:
        text: str = await self._ask("decode", list(token_ids))
        return text

    async def prepare(
        self,
        prompt: str | Sequence[int],
        sampling: SamplingOptions,
        *,
        add_special_tokens: bool = True,
        adapter: str | None = None,
        images: Sequence[PIL.Image.Image] = (),
    ) -> PreparedRequest:
        prepared: PreparedRequest = await self._ask(
            "prepare", prompt, sampling, add_special_tokens, adapter, list(images)
        )
        return prepared

    async def generate(
        self, request: PreparedRequest, request_id: str, *, stream: bool = True
    ) -> AsyncGenerator[GenerationDelta, None]:
        self._running += 1
        try:
            for _ in range(self._attempts()):
                replica = await self._replica()
                produced = lost = False
                async with aclosing(self._stream(replica, request, request_id, stream)) as deltas:
                    async for delta in deltas:
                        if delta is None:
                            lost = True  # the replica is gone
                            break
                        produced = True
                        yield delta
                if not lost:
                    return
                if produced:
                    raise UnavailableError(
                        f"the replica serving model '{self.model_id}' stopped mid-request; retry", retry_after=5
                    )
            raise UnavailableError(f"no replica could serve model '{self.model_id}'; retry later", retry_after=10)
        finally:
            self._running -= 1

    async def _stream(
        self, replica: ReplicaHandle, request: PreparedRequest, request_id: str, stream: bool
    ) -> AsyncGenerator[GenerationDelta | None, None]:
        """The replica's deltas; ``None`` once, at the end, if the replica was lost.

        Left early (the client went away), the call is cancelled on the replica, which
        closes the engine's generator there and so aborts the request.
        """
        refs = replica.actor.generate.options(num_returns="streaming").remote(
            self.model_id, request, request_id, stream
        )
        finished = False
        try:
            async for ref in refs:
                # Awaited directly (not through a concurrent future): one thread hop
                # fewer per delta. Errors are those of ``Router.call``, handled below.
                yield await ref
            finished = True
        except RayActorError:
            finished = True
            self._router.lost(replica)
            yield None
        except RayTaskError as exc:
            finished = True
            raise unwrap(exc) from None
        finally:
            if not finished:
                ray.cancel(refs)

    async def abort(self, request_id: str) -> None:
        replica = self._router.bound(self.model_id)
        if replica is None or not replica.alive:
            return  # a lost replica holds no request any more
        with suppress(ReplicaLost):
            await self._router.call(replica, replica.actor.abort.remote(self.model_id, request_id))

    def stats(self) -> EngineStats:
        return EngineStats(running=self._running)

    async def shutdown(self) -> None:
        """Nothing to stop here: the replicas own the engines, and the router the replicas."""
