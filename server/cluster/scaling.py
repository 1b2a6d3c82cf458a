"""How many replicas the cluster should run: the autoscaling rule, free of Ray.

The ingress runs replicas as its own actors rather than Ray Serve deployments (why, in
docs/cluster.md), so it scales them itself, on the rule Ray Serve's autoscaler uses:
requests waiting per replica against a target, within the operator's bounds.

A model stays on the replica that loaded it, so one more replica takes the models
loaded from then on (and those of a replica that dies); it relieves a cluster that
serves many models, not one hot model.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ScaleBounds:
    minimum: int
    maximum: int
    target_queue: int  # requests waiting per replica past which one more starts

    def __post_init__(self) -> None:
        if not 1 <= self.minimum <= self.maximum:
            raise ValueError(f"replica bounds: need 1 <= minimum ({self.minimum}) <= maximum ({self.maximum})")


def desired_replicas(current: int, queued: int, idle: int, bounds: ScaleBounds) -> int:
    """Replicas to run next, one step from ``current`` at most (a step costs an engine load).

    ``queued``: requests waiting across the cluster; ``idle``: replicas holding no model
    and serving nothing, the only ones that may be stopped.
    """
    if current < bounds.minimum:
        return bounds.minimum
    if current > bounds.maximum:
        return bounds.maximum
    if queued > bounds.target_queue * current and current < bounds.maximum:
        return current + 1
    if queued == 0 and idle > 0 and current > bounds.minimum:
        return current - 1
    return current
