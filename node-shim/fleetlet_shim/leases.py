"""The lease controller: each connected car's heartbeat, one Lease write per renewal interval.

``sync(car)`` renews the car's Lease in ``kube-node-lease`` (one PATCH; the first renewal of a Node this shim
created POSTs it) and asks to run again one interval later, measured from when the renewal fell due, so every
car keeps its own phase and 5,000 cars make a steady trickle of writes, not bursts. A car whose link is down, or
whose VehicleNode or Node is gone, is not renewed: its Lease lapses and the node lifecycle controller does what
it does for any silent node. A failed renewal is retried with a short backoff (the lease duration leaves room
for one late renewal). Kept apart from Node status, as the kubelet keeps its heartbeat apart from status.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

from fleetlet.kube import Informer, Requeue, Retry
from fleetlet.kube.client import ApiError

from .cars import CarRegistry
from .kube import ShimApi
from .metrics import ShimMetrics
from .settings import ShimSettings


class LeaseController:
    def __init__(self, api: ShimApi, registry: CarRegistry, nodes: Informer, settings: ShimSettings,
                 metrics: ShimMetrics) -> None:
        self.api = api
        self.registry = registry
        self.nodes = nodes
        self.settings = settings
        self.metrics = metrics
        self._due: dict[str, float] = {}  # car -> when its next renewal falls due (monotonic)

    def schedule(self, car: str, delay_s: float) -> float:
        """Record when ``car``'s next renewal is due; returns the delay to enqueue it with."""
        self._due[car] = time.monotonic() + delay_s
        return delay_s

    def _max_deferral_s(self, early_s: float) -> float:
        """How long a renewal may wait for urgent writes: at most 3 s, and never into the last third of the slack
        between the renewal interval and the lease duration."""
        slack = self.settings.lease_duration_s - self.settings.lease_renew_interval_s
        return max(0.0, min(3.0, slack / 3 + min(early_s, 0.0)))

    async def sync(self, name: str) -> Requeue | None:
        car = self.registry.get(name)
        node = self.nodes.get(name)
        if car is None or not car.connected or self.registry.vehiclenodes.get(name) is None:
            self._due.pop(name, None)
            return None
        if node is None:
            if not car.lease_exists:  # just registered: the informer has not shown us the Node (its uid) yet
                raise Retry("waiting for the new Node in the cache", delay=0.5)
            # Not registered (or being re-created): the node controller enqueues us after registering it.
            self._due.pop(name, None)
            return None
        interval = self.settings.lease_renew_interval_s
        now = time.monotonic()
        due = self._due.get(name, now)
        if due - now > 0.05:
            return Requeue(after=due - now)  # an early wake-up (a duplicate enqueue): keep the car's phase
        node_uid = node["metadata"].get("uid")
        # Let a burst of urgent writes (cars that started driving) go first; the Lease has room to be late.
        await self.api.urgent.quiet(self._max_deferral_s(due - now))
        try:
            await self.api.renew_lease(name, node_uid, self.settings.lease_duration_s, datetime.now(UTC),
                                       exists=car.lease_exists)
        except ApiError as exc:
            # Retry soon; the Lease stays valid for lease_duration, which covers more than one attempt.
            raise Retry(f"lease renewal failed: {exc}") from exc
        car.lease_exists = True
        done = time.monotonic()
        self.metrics.lease_renewals.inc()
        self.metrics.lease_lag.observe(max(0.0, done - due))
        # Keep the phase: the next renewal is due one interval after this one fell due, not after it finished.
        next_due = max(due + interval, done + interval / 2)
        self._due[name] = next_due
        return Requeue(after=next_due - done)
