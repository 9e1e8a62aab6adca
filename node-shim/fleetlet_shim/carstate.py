"""The car-state controller: the owner's rules, applied to the car's Node as taints, labels and a cordon.

``sync(car)`` runs the shared pure policy (``fleetlet.policy.evaluate``) on the car's latest telemetry, its owner's
rules (VehicleNode spec), its link state and its trust record, and makes the Node say so:

- the ``fleetlet.io/*`` car-state taints, written read-modify-write with the resourceVersion precondition; every
  taint that is not Fleetlet's own (the controller-manager's ``node.kubernetes.io/*``, a user's) is kept as read,
  and on a conflict the Node is read again and the write redone;
- the labels that follow telemetry (state-of-charge band, plugged in);
- the cordon while the owner has paused the car. A cordon someone else set (``kubectl drain``) is never lifted:
  the shim lifts only the cordon it set itself (marked by an annotation).

It also sends the car its owner's current rules when they change (the agent enforces them itself), hands changed
conditions to the telemetry mirror (they go to VehicleNode status with the telemetry they follow), records an
Event when the car becomes (un)schedulable, and asks to run again when the answer changes by time alone (an
availability window opens or closes, the energy day rolls over). It runs on every telemetry report, so a
threshold crossing reaches the Node at once; when nothing changed it writes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from fleetlet.api.v1alpha1.vehiclenode import ConditionType
from fleetlet.carlink.protocol import OwnerPolicy
from fleetlet.kube import Informer, Requeue, Retry
from fleetlet.kube.client import ApiError
from fleetlet.kube.events import EventRecorder, node_ref
from fleetlet.policy import CarPolicy, evaluate

from . import nodespec
from .cars import Car, CarRegistry
from .interfaces import CarChannel
from .kube import ShimApi, project_node
from .metrics import ShimMetrics

log = logging.getLogger(__name__)

CORDON_ANNOTATION = "fleetlet.io/cordoned-by"
CORDON_OWNER_PAUSED = "owner-paused"


def evaluate_car(registry: CarRegistry, car: Car, now: datetime, node: dict[str, Any] | None = None) -> CarPolicy:
    """The owner's rules applied to ``car`` now; ``node`` seeds the hysteresis memory after a restart."""
    rules = registry.rules(car.name)
    previous = car.policy
    if previous is None and node is not None:
        previous = CarPolicy.observed(
            ((t.get("key", ""), t.get("value"), t.get("effect", "")) for t in node["spec"]["taints"]),
            node["metadata"].get("labels") or {},
        )
    if rules is None:
        raise Retry("the car's VehicleNode is missing or invalid")
    return evaluate(rules.policy, car.telemetry, now=now, paused=rules.paused, connected=car.connected,
                    trusted=registry.trusted(car.name), previous=previous)


class CarStateController:
    def __init__(self, api: ShimApi, registry: CarRegistry, nodes: Informer, channel: CarChannel,
                 events: EventRecorder, metrics: ShimMetrics, on_conditions: Callable[[str], None]) -> None:
        self.api = api
        self.registry = registry
        self.nodes = nodes
        self.channel = channel
        self.events = events
        self.metrics = metrics
        self._on_conditions = on_conditions
        # car -> (resourceVersion our last write was made against, the Node our write returned). The next sync
        # often runs before the informer has seen our own write (the VehicleNode status write it set off echoes
        # back first): reading the informer's Node then would redo the write against a stale resourceVersion
        # and pay a 409, a GET and a retry for nothing. Dropped once the informer moves past that version.
        self._written: dict[str, tuple[str, dict[str, Any]]] = {}

    async def sync(self, name: str) -> Requeue | None:
        car = self.registry.get(name)
        rules = self.registry.rules(name)
        if car is None or rules is None:
            self._written.pop(name, None)
            return None
        if car.connected and car.policy_generation_sent != rules.generation:
            msg = OwnerPolicy(policy=rules.policy, paused=rules.paused, generation=rules.generation)
            if not self.channel.send(name, msg):
                raise Retry("the car's link is busy; its owner's rules are sent again shortly", delay=1.0)
            car.policy_generation_sent = rules.generation
        now = datetime.now(UTC)
        node = self._freshest(name, self.nodes.get(name))
        before = car.policy
        policy = evaluate_car(self.registry, car, now, node)
        car.policy = policy
        if before is None or _conditions(before) != _conditions(policy):
            self._on_conditions(name)
        if before is not None:
            self._record_transition(name, before, policy)
        if node is not None:
            await self._write_node(name, node, policy, now)
        if policy.next_check_at is not None:
            return Requeue(after=max(0.5, (policy.next_check_at - now).total_seconds()))
        return None

    def _freshest(self, name: str, cached: dict[str, Any] | None) -> dict[str, Any] | None:
        """The informer's Node, or the one our last write returned while the informer still shows the version
        that write replaced."""
        mine = self._written.get(name)
        if mine is None or cached is None:
            return cached
        if cached["metadata"].get("resourceVersion") == mine[0]:
            return mine[1]
        del self._written[name]  # the informer has our write, or something newer
        return cached

    async def _write_node(self, name: str, node: dict[str, Any], policy: CarPolicy, now: datetime) -> None:
        for attempt in range(3):
            taints = nodespec.merge_taints(node["spec"]["taints"], policy, now)
            labels = node["metadata"].get("labels") or {}
            label_patch: dict[str, str | None] = {k: v for k, v in policy.labels.items() if labels.get(k) != v}
            annotations = node["metadata"].get("annotations") or {}
            ours = annotations.get(CORDON_ANNOTATION) == CORDON_OWNER_PAUSED
            cordoned = bool(node["spec"]["unschedulable"])
            if policy.cordoned:
                want_cordon, marker = True, (CORDON_OWNER_PAUSED if not cordoned or ours else None)
            else:
                # Lift only our own cordon: a drain's or an admin's stays.
                want_cordon, marker = (cordoned and not ours), None
            annotation_patch: dict[str, str | None] = {}
            if marker != annotations.get(CORDON_ANNOTATION) and (marker is not None or ours):
                annotation_patch[CORDON_ANNOTATION] = marker
            if (nodespec.same_taints(taints, node["spec"]["taints"]) and not label_patch and not annotation_patch
                    and want_cordon == cordoned):
                return
            try:
                written = await self.api.patch_node(name, node["metadata"]["resourceVersion"], label_patch,
                                                    annotation_patch, taints, want_cordon)
            except ApiError as exc:
                if exc.conflict and attempt < 2:
                    node = await self.api.get_node(name)  # someone wrote the Node meanwhile: read it again
                    self.metrics.taint_conflicts.inc()
                    continue
                if exc.not_found:
                    return  # the Node is gone; the node controller registers it again with these taints
                raise
            self.metrics.taint_writes.inc()
            self._written[name] = (node["metadata"]["resourceVersion"], project_node(written))
            keys = ",".join(t.key.removeprefix("fleetlet.io/") for t in policy.taints) or "none"
            log.info("car %s: Node taints now %s%s", name, keys, " (cordoned)" if want_cordon else "")
            return
        raise Retry("the Node kept changing under the taint write")

    def _record_transition(self, name: str, before: CarPolicy, after: CarPolicy) -> None:
        old = before.condition(ConditionType.SCHEDULABLE)
        new = after.condition(ConditionType.SCHEDULABLE)
        if (old.status, old.reason) == (new.status, new.reason):
            return
        taints = ", ".join(f"{t.key}:{t.effect}" for t in after.taints) or "no car-state taints"
        type_ = "Normal" if new.status == "True" else "Warning"
        self.events.record(node_ref(name), type_, new.reason, f"{new.message} (taints: {taints})")


def _conditions(policy: CarPolicy) -> tuple[tuple[str, str, str], ...]:
    # Messages carry live numbers ("state of charge 42 %"): they ride along with the next telemetry write;
    # only a change of status or reason is urgent.
    return tuple((c.type, c.status, c.reason) for c in policy.conditions)
