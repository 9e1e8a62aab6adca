"""The node controller: one Node per connected car, Ready while its link is up, NotReady soon after it is gone.

``sync(car)`` compares what the car's Node should be with the Node the informer holds:
- a connected car without a Node: register it (one POST: labels, taints and cordon from the owner's policy as
  the car's first telemetry shows it, status, owner reference to the VehicleNode), then hand it to the lease
  controller. A car is registered only once its first telemetry arrived (or after a short wait), so a Node is
  never born open to work its car's state forbids.
- a connected car whose Node says NotReady, or whose status was last reported more than the report interval
  ago: apply Ready status (the kubelet's nodeStatusReportFrequency).
- a car whose link closed: after a short grace (a blip costs nothing), apply Ready=False/CarLinkLost so the
  real node lifecycle controller taints it at once instead of after its grace period; the Lease lapses anyway.

A deleted VehicleNode stops everything for its car (the Node goes with it: owner reference). A Node deleted by
someone while its car is connected is registered again. Idempotent: safe to run at any time for any car.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime

from fleetlet.kube import Informer, Requeue, Retry
from fleetlet.kube.client import ApiError
from fleetlet.kube.events import EventRecorder, node_ref

from . import nodespec
from .cars import CarRegistry
from .carstate import evaluate_car
from .kube import ShimApi
from .settings import ShimSettings

log = logging.getLogger(__name__)

FIRST_TELEMETRY_WAIT_S = 5.0
NOT_READY_RECHECK_S = 10.0  # the kubelet's nodeStatusUpdateFrequency
LeaseEnqueue = Callable[[str, float], None]
"""How the node controller hands a car to the lease controller: ``(car, delay_s)``."""


class NodeController:
    def __init__(self, api: ShimApi, registry: CarRegistry, nodes: Informer, settings: ShimSettings,
                 events: EventRecorder, enqueue_lease: LeaseEnqueue) -> None:
        self.api = api
        self.registry = registry
        self.nodes = nodes
        self.settings = settings
        self.events = events
        self._enqueue_lease = enqueue_lease
        self._status_at: dict[str, float] = {}  # car -> when this process last applied its Ready status

    async def sync(self, name: str) -> Requeue | None:
        car = self.registry.get(name)
        vn = self.registry.vehiclenode(name) if car is not None else None
        if car is None or vn is None:
            self._status_at.pop(name, None)
            return None
        node = self.nodes.get(name)
        now = time.monotonic()
        s = self.settings
        endpoint = nodespec.Endpoint(s.advertise_address, s.kubelet_port)
        if car.connected:
            if node is None or node["metadata"].get("deletionTimestamp"):
                if node is not None:
                    raise Retry("the old Node is still being deleted", delay=1.0)
                if car.telemetry is None and now - car.changed_at < FIRST_TELEMETRY_WAIT_S:
                    return Requeue(after=0.25)
                policy = evaluate_car(self.registry, car, datetime.now(UTC))
                car.policy = policy
                status = nodespec.node_status(vn, endpoint, s.max_pods_per_car, True, "CarConnected",
                                              "the car's link is up and it reports to this shim", datetime.now(UTC), car.hello.providers)
                body = nodespec.node_manifest(vn, nodespec.hardware_labels(vn, s.shim_id), status, policy)
                try:
                    await self.api.create_node(body)
                except ApiError as exc:
                    if exc.conflict:  # created meanwhile (another process, or our informer is behind)
                        raise Retry("the Node exists but is not in the cache yet", delay=0.5) from exc
                    raise
                self._status_at[name] = now
                car.lease_exists = False
                # No Event of ours: the node lifecycle controller records RegisteredNode for every new Node, and
                # one more POST per car is a fifth of a fleet's registration writes.
                log.info("car %s: registered its Node", name)
                # The Node is born with a fresh Ready heartbeat, which the node lifecycle controller honours
                # until a Lease exists: the first renewal (which creates the Lease) comes at a random point of
                # the first interval, so a fleet coming online does not double its write burst.
                self._enqueue_lease(name, random.uniform(0.1, 1.0) * s.lease_renew_interval_s)
                return Requeue(after=s.status_report_interval_s)
            ready = (node["status"].get("ready") or {}).get("status") == "True"
            last = self._status_at.get(name)
            due = last is None or now - last >= s.status_report_interval_s
            if not ready and last is not None and now - last < NOT_READY_RECHECK_S:
                # As a kubelet does: the node lifecycle controller marked it Unknown (our heartbeats did not get
                # through); say Ready again, but not in a tight loop against it.
                return Requeue(after=NOT_READY_RECHECK_S - (now - last))
            if not ready or due:
                if last is None:
                    self._enqueue_lease(name, 0.0)  # a Node this process did not create: renew at once
                status = nodespec.node_status(vn, endpoint, s.max_pods_per_car, True, "CarConnected",
                                              "the car's link is up and it reports to this shim", datetime.now(UTC),
                                              car.hello.providers, previous_ready=node["status"].get("ready"))
                await self.api.apply_node_status(name, status)
                self._status_at[name] = now
                if not ready:
                    self.events.record(node_ref(name), "Normal", "CarConnected", "the car's link is up again")
            return Requeue(after=max(1.0, s.status_report_interval_s - (now - self._status_at[name])))
        # Disconnected.
        self._status_at.pop(name, None)
        waited = now - car.changed_at
        if waited < s.reconnect_grace_s:
            return Requeue(after=s.reconnect_grace_s - waited)
        if node is not None and (node["status"].get("ready") or {}).get("reason") != "CarLinkLost":
            status = nodespec.node_status(
                vn, endpoint, s.max_pods_per_car, False, "CarLinkLost",
                f"the car's link closed ({car.disconnect_reason or 'closed'}); its work is being rescheduled",
                datetime.now(UTC), car.hello.providers, previous_ready=node["status"].get("ready"))
            await self.api.apply_node_status(name, status)
            self.events.record(node_ref(name), "Warning", "CarLinkLost",
                               f"the car's link closed ({car.disconnect_reason or 'closed'})")
        return None
