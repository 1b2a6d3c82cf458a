"""Which replica serves a model: model-aware routing, failover and autoscaling.

A model is bound to one replica at a time. Its first request binds it to a replica that
already holds it (after an ingress restart, say), else to the replica with the most free
memory and, among equals, the fewest requests, and loads it there; every later request
goes to that replica, so models stay where they were loaded instead of every replica
loading every model (what a plain load balancer in front of several servers does).

A replica that dies (its node lost, its process killed) is noticed by the first call
that reaches it (Ray raises ``RayActorError``, so nothing waits on it) or by the health
check: its models are unbound, the next request for each loads it on another replica,
and a replacement replica starts when fewer than the minimum run.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import ray
from ray.exceptions import RayActorError, RayTaskError

from server.batch.ray_hosts import Placement, actor_options
from server.cluster.protocol import EngineFacts, ReplicaInfo
from server.cluster.replica import Replica
from server.cluster.scaling import ScaleBounds, desired_replicas
from server.errors import EngineError, ServingError, UnavailableError
from server.registry import Registry
from server.settings import Settings

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Seconds between health checks (and autoscaling decisions).
CHECK_INTERVAL_SECONDS = 2.0
# A replica that does not answer a health check in this long is reported, not dropped:
# it may be busy loading a model (which holds no lock an info call needs, but a
# starved event loop answers late).
INFO_TIMEOUT_SECONDS = 30.0
# How long a replica's engines get to shut down when the ingress stops.
SHUTDOWN_TIMEOUT_SECONDS = 60.0
# How long a new replica may take to start (imports, engine pool) before it is given up.
START_TIMEOUT_SECONDS = 600.0


class ReplicaLost(Exception):
    """The replica a call went to is gone; the caller may retry on another."""


@dataclass(eq=False)
class ReplicaHandle:
    """The ingress's view of one replica actor."""

    name: str
    actor: Any  # ray.actor.ActorHandle of a Replica
    resource: str | None  # the custom resource that placed it, if any
    info: ReplicaInfo | None = None
    alive: bool = True
    routed: int = 0  # calls the ingress has routed to it
    loads: int = 0  # model loads the router asked of it
    ready: asyncio.Event = field(default_factory=asyncio.Event)


async def _result(ref: Any, timeout: float | None = None) -> Any:
    """Await a Ray object ref, with a deadline."""
    return await asyncio.wait_for(asyncio.wrap_future(ref.future()), timeout)


def unwrap(exc: RayTaskError) -> BaseException:
    """The error a replica raised: a ``ServingError`` as it was (its status and message
    are meant for the caller), anything else as an engine failure."""
    cause = exc.cause
    if isinstance(cause, ServingError):
        return cause
    return EngineError(f"the replica failed ({type(cause).__name__ if cause else 'unknown error'})")


class Router:
    def __init__(self, settings: Settings, registry: Registry, *, queued: Callable[[], int] = lambda: 0):
        self._settings = settings
        self._registry = registry
        self._queued = queued
        resources = list(settings.ray_replica_resources)
        maximum = settings.ray_max_replicas or (len(resources) if resources else settings.ray_min_replicas)
        if resources:
            maximum = min(maximum, len(resources))
        self._bounds = ScaleBounds(settings.ray_min_replicas, maximum, settings.ray_target_queue)
        self._resources = resources
        self.replicas: list[ReplicaHandle] = []
        self._bound: dict[str, ReplicaHandle] = {}
        self._binding: dict[str, asyncio.Lock] = {}
        self._numbers = itertools.count()
        self._tasks: set[asyncio.Task[None]] = set()
        self._checker: asyncio.Task[None] | None = None

    # ----- replicas ------------------------------------------------------------------

    @property
    def live(self) -> list[ReplicaHandle]:
        return [r for r in self.replicas if r.alive]

    def _free_resource(self) -> str | None:
        held = {r.resource for r in self.live}
        return next((name for name in self._resources if name not in held), None)

    def _launch(self) -> ReplicaHandle | None:
        """Start one replica actor (it becomes ready in the background); None when every
        placing resource is taken."""
        resource = self._free_resource()
        if self._resources and resource is None:
            return None
        # Numbered across the ingress's life: a replacement is told apart from the one it replaces.
        number = next(self._numbers)
        name = f"{resource}-{number}" if resource is not None else f"replica-{number}"
        options = actor_options(self._settings, Placement(name, resource=resource) if resource is not None else None)
        actor = ray.remote(Replica).options(**options).remote(name, self._settings, self._registry)
        replica = ReplicaHandle(name, actor, resource)
        self.replicas.append(replica)
        self._spawn(self._await_start(replica))
        logger.info("starting replica %s", name)
        return replica

    async def _await_start(self, replica: ReplicaHandle) -> None:
        try:
            replica.info = await _result(replica.actor.start.remote(), START_TIMEOUT_SECONDS)
        except (RayActorError, RayTaskError, TimeoutError) as exc:
            logger.error("replica %s failed to start: %r", replica.name, exc)
            self.lost(replica)
            return
        replica.ready.set()
        logger.info("replica %s ready (pid %d on %s)", replica.name, replica.info.pid, replica.info.node)

    def start(self) -> None:
        """Start the minimum of replicas (ready in the background; a request waits for the
        first), and check them periodically from now on."""
        for _ in range(self._bounds.minimum):
            self._launch()
        self._checker = asyncio.create_task(self._check_forever())

    def lost(self, replica: ReplicaHandle) -> None:
        """``replica`` is gone: its models are unbound, to load elsewhere on their next request."""
        if not replica.alive:
            return
        replica.alive = False
        self.replicas.remove(replica)
        replica.ready.set()  # wake whoever waits for it; they find it dead
        moved = [model for model, bound in self._bound.items() if bound is replica]
        for model in moved:
            del self._bound[model]
        logger.error("replica %s is gone; its models %s load elsewhere on their next request", replica.name, moved)
        with_suppressed_kill(replica)

    def _spawn(self, coroutine: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def refresh(self) -> None:
        """Ask every ready replica what it holds; a dead one is found out here."""

        async def ask(replica: ReplicaHandle) -> None:
            try:
                replica.info = await _result(replica.actor.info.remote(), INFO_TIMEOUT_SECONDS)
            except RayActorError:
                self.lost(replica)
            except (RayTaskError, TimeoutError) as exc:
                logger.warning("replica %s did not report: %r", replica.name, exc)

        await asyncio.gather(*(ask(r) for r in self.live if r.ready.is_set()))

    async def _check_forever(self) -> None:
        while True:
            await asyncio.sleep(CHECK_INTERVAL_SECONDS)
            try:
                await self.refresh()
                self.scale()
            except Exception:
                logger.exception("checking replicas failed; checking goes on")

    def scale(self) -> None:
        """One autoscaling step (``server.cluster.scaling``)."""
        live = self.live
        queued = self._queued() + sum(r.info.queued for r in live if r.info is not None)
        idle = [r for r in live if r.ready.is_set() and r.info is not None and _idle(r, self._bound)]
        want = desired_replicas(len(live), queued, len(idle), self._bounds)
        if want > len(live):
            logger.info("%d replicas running, %d requests queued: starting one more", len(live), queued)
            self._launch()
        elif want < len(live) and idle:
            victim = idle[-1]
            logger.info("replica %s holds no model and serves nothing: stopping it", victim.name)
            victim.alive = False
            self.replicas.remove(victim)
            with_suppressed_kill(victim)

    async def shutdown(self) -> None:
        """Stop every replica: its engines shut down cleanly, then its actor goes."""
        if self._checker is not None:
            self._checker.cancel()
        for task in list(self._tasks):
            task.cancel()
        live = self.live
        stops = [_result(r.actor.shutdown.remote(), SHUTDOWN_TIMEOUT_SECONDS) for r in live if r.ready.is_set()]
        for outcome in await asyncio.gather(*stops, return_exceptions=True):
            if isinstance(outcome, BaseException):
                logger.warning("a replica did not shut down cleanly: %r", outcome)
        for replica in live:
            replica.alive = False
            with_suppressed_kill(replica)

    # ----- routing -------------------------------------------------------------------

    def bound(self, model_id: str) -> ReplicaHandle | None:
        return self._bound.get(model_id)

    async def open(self, model_id: str) -> tuple[ReplicaHandle, EngineFacts]:
        """Bind ``model_id`` to a replica and load it there (see the module docstring)."""
        lock = self._binding.setdefault(model_id, asyncio.Lock())
        async with lock:
            tried: set[str] = set()
            while True:
                replica = self._bound.get(model_id)
                if replica is None or not replica.alive:
                    replica = await self._choose(model_id, tried)
                replica.loads += 1
                try:
                    facts: EngineFacts = await self.call(replica, replica.actor.load.remote(model_id))
                except ReplicaLost:
                    tried.add(replica.name)
                    continue
                self._bound[model_id] = replica
                return replica, facts

    async def _choose(self, model_id: str, tried: set[str]) -> ReplicaHandle:
        await self._wait_for_any()
        await self.refresh()
        candidates = [r for r in self.live if r.ready.is_set() and r.info is not None and r.name not in tried]
        if not candidates:
            raise UnavailableError(
                f"no replica of the cluster can take model '{model_id}' now; replicas are starting", retry_after=10
            )
        holding = [r for r in candidates if r.info is not None and r.info.holds(model_id)]
        if holding:
            return holding[0]
        choice = max(candidates, key=lambda r: (r.info.free_bytes, -r.info.load) if r.info else (0, 0))
        logger.info("model %s goes to replica %s", model_id, choice.name)
        return choice

    async def _wait_for_any(self) -> None:
        """Until a replica is ready (or none is left starting); with fewer than the
        minimum running (one died), a replacement is started first."""
        if len(self.live) < self._bounds.minimum:
            self._launch()
        starting = [r for r in self.live if not r.ready.is_set()]
        if starting and not any(r.ready.is_set() for r in self.live):
            await asyncio.wait([asyncio.ensure_future(r.ready.wait()) for r in starting], return_when="FIRST_COMPLETED")

    async def call(self, replica: ReplicaHandle, ref: Any) -> Any:
        """The result of a call to ``replica``: its ``ServingError`` raised as it was,
        ``ReplicaLost`` (and the replica dropped) when the replica is gone."""
        try:
            return await _result(ref)
        except RayTaskError as exc:
            raise unwrap(exc) from None
        except RayActorError as exc:
            self.lost(replica)
            raise ReplicaLost(replica.name) from exc


def _idle(replica: ReplicaHandle, bound: dict[str, ReplicaHandle]) -> bool:
    info = replica.info
    assert info is not None
    holds_nothing = not any(p.state != "not_loaded" for p in info.models.values())
    return holds_nothing and info.load == 0 and replica not in bound.values()


def with_suppressed_kill(replica: ReplicaHandle) -> None:
    """Kill ``replica``'s actor if it still runs (a replica stopped or given up)."""
    try:
        ray.kill(replica.actor, no_restart=True)
    except Exception as exc:  # it may be gone already, or Ray shutting down
        logger.debug("killing replica %s: %r", replica.name, exc)
