"""The cars this shim replica serves: who is connected, what each said in its hello, what it holds, its latest
telemetry and the owner-policy state computed from it.

What it is for: ``CarRegistry`` is the link's ``LinkHandler``. It records each car's connection and messages and
tells its listeners (``CarEvents``: the controllers, through the composition root) which keys need a look. It
keeps the state the controllers read; it makes no API calls and sends nothing to cars itself.

A car that dials in before its VehicleNode exists is kept waiting and served the moment the VehicleNode
appears; a car whose VehicleNode is deleted is forgotten (its Lease and telemetry writes stop).

What it must never do: block (the link bounds handler time), trust a car name it did not get from the link
(which read it from the certificate), or keep a car whose VehicleNode is gone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from fleetlet.api.v1alpha1 import Telemetry, VehicleNode
from fleetlet.api.v1alpha1.vehiclenode import Policy
from fleetlet.carlink.protocol import CarMessage, Hello, Log, PodStatus, TelemetryReport
from fleetlet.kube import Change, Informer
from fleetlet.policy import CarPolicy

from .interfaces import CarEvents
from .logs import PodLogs

log = logging.getLogger(__name__)

# Telemetry fields whose change is written (and turned into taints) at once; the rest are coalesced.
URGENT_FIELDS = ("drive_state", "plugged_in", "charging")


@dataclass(eq=False)
class Car:
    """One car's state in this shim. Changed only on the event loop."""

    name: str
    hello: Hello
    connected: bool = True
    generation: int = 0  # bumped on every connect
    changed_at: float = field(default_factory=time.monotonic)  # last connect or disconnect
    disconnect_reason: str = ""
    held: set[str] = field(default_factory=set)  # pod uids the car holds (its hello, then assigns), until acked
    stop_sent: dict[str, float] = field(default_factory=dict)  # uid -> when a stop last went out
    telemetry: Telemetry | None = None
    policy: CarPolicy | None = None  # the last evaluation (also the hysteresis memory)
    policy_generation_sent: int | None = None  # VehicleNode generation of the OwnerPolicy the car has
    lease_exists: bool = True  # False for a car whose Node this shim created and whose Lease is not yet written


@dataclass(frozen=True, slots=True)
class OwnerRules:
    policy: Policy
    paused: bool
    generation: int


class CarRegistry:
    """See the module docstring. ``vehiclenodes`` is the (synced) VehicleNode informer of this replica."""

    def __init__(self, vehiclenodes: Informer, logs: PodLogs) -> None:
        self.vehiclenodes = vehiclenodes
        self.logs = logs
        self._cars: dict[str, Car] = {}
        self._policies: dict[str, tuple[str, OwnerRules]] = {}  # name -> (resourceVersion, parsed rules)
        self._waiting: dict[str, Hello] = {}
        self._listeners: list[CarEvents] = []
        vehiclenodes.add_handler(self._vehiclenode_changed)

    def subscribe(self, listener: CarEvents) -> None:
        self._listeners.append(listener)

    # ---- reading -------------------------------------------------------------------------------------------

    def get(self, name: str) -> Car | None:
        return self._cars.get(name)

    def __iter__(self) -> Iterator[Car]:
        return iter(list(self._cars.values()))

    def __len__(self) -> int:
        return len(self._cars)

    def vehiclenode(self, name: str) -> VehicleNode | None:
        """The car's VehicleNode as a model, or None if it is gone or no longer parses (logged)."""
        body = self.vehiclenodes.get(name)
        if body is None:
            return None
        try:
            return VehicleNode.model_validate(_without_status(body))
        except ValueError as exc:
            log.warning("car %s: its VehicleNode does not parse (%s); not serving it", name, exc)
            return None

    def rules(self, name: str) -> OwnerRules | None:
        """The owner's rules of the car (parsed once per VehicleNode version: this runs per telemetry report)."""
        body = self.vehiclenodes.get(name)
        if body is None:
            self._policies.pop(name, None)
            return None
        rv = body["metadata"].get("resourceVersion", "")
        cached = self._policies.get(name)
        if cached is not None and cached[0] == rv:
            return cached[1]
        spec = body.get("spec") or {}
        try:
            rules = OwnerRules(Policy.model_validate(spec.get("policy") or {}), bool(spec.get("paused", False)),
                               int(body["metadata"].get("generation") or 0))
        except ValueError as exc:
            log.warning("car %s: its owner's policy does not parse (%s)", name, exc)
            return None
        self._policies[name] = (rv, rules)
        return rules

    def trusted(self, name: str) -> bool:
        body = self.vehiclenodes.get(name)
        trust = ((body or {}).get("status") or {}).get("trust") or {}
        return not trust.get("untrusted", False)

    # ---- LinkHandler ---------------------------------------------------------------------------------------

    async def car_connected(self, car: str, hello: Hello) -> None:
        if self.vehiclenodes.get(car) is None:
            log.warning("car %s: no VehicleNode yet; it is served as soon as its owner registers it", car)
            self._waiting[car] = hello
            return
        self._waiting.pop(car, None)
        state = self._cars.get(car)
        if state is None:
            state = self._cars[car] = Car(name=car, hello=hello)
        state.hello, state.connected = hello, True
        state.generation += 1
        state.changed_at = time.monotonic()
        state.held = {a.uid for a in hello.assignments}
        state.stop_sent.clear()
        state.policy_generation_sent = None  # a new link: tell the car its owner's rules again
        for listener in self._listeners:
            listener.car_changed(car)
            listener.car_pods(car)

    async def car_message(self, car: str, msg: CarMessage) -> None:
        state = self._cars.get(car)
        if state is None:
            return
        if isinstance(msg, TelemetryReport):
            old, new = state.telemetry, msg.telemetry
            state.telemetry = new
            urgent = old is None or any(getattr(old, f) != getattr(new, f) for f in URGENT_FIELDS)
            for listener in self._listeners:
                listener.car_telemetry(car, urgent)
        elif isinstance(msg, PodStatus):
            for listener in self._listeners:
                listener.pod_report(car, msg)
        elif isinstance(msg, Log):
            self.logs.add(msg.uid, msg.offset, list(msg.lines))

    async def car_disconnected(self, car: str, reason: str) -> None:
        self._waiting.pop(car, None)
        state = self._cars.get(car)
        if state is None:
            return
        state.connected = False
        state.changed_at = time.monotonic()
        state.disconnect_reason = reason
        log.info("car %s: link down (%s)", car, reason)
        if reason == "replaced":
            return  # a newer connection for the same car follows at once
        for listener in self._listeners:
            listener.car_changed(car)
            listener.car_pods(car)

    # ---- VehicleNodes --------------------------------------------------------------------------------------

    def _vehiclenode_changed(self, change: Change) -> None:
        name = change.key
        if change.type == "DELETED":
            self._policies.pop(name, None)
            if self._cars.pop(name, None) is not None:
                log.info("car %s: its VehicleNode was deleted; no longer serving it", name)
            for listener in self._listeners:
                listener.car_changed(name)
            return
        hello = self._waiting.pop(name, None)
        if hello is not None:
            # Served now; the link stays as it is (the handler contract is quick, so do it inline).
            self._cars[name] = Car(name=name, hello=hello)
            self._cars[name].held = {a.uid for a in hello.assignments}
            for listener in self._listeners:
                listener.car_changed(name)
                listener.car_pods(name)
            return
        if name in self._cars:
            for listener in self._listeners:
                listener.car_changed(name)


def _without_status(body: dict[str, Any]) -> dict[str, Any]:
    # The shim's projection keeps only conditions and trust of status; the model needs none of it.
    return {k: v for k, v in body.items() if k != "status"}
