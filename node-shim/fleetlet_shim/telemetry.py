"""The telemetry mirror: each car's latest telemetry, its conditions and the taints in force, in VehicleNode status.

``sync(car)`` writes ``status.telemetry``, ``status.conditions`` (the policy's six, each keeping its
lastTransitionTime until its status flips, with the VehicleNode's generation) and ``status.taints`` in one merge
patch. A change of drive state, plug or charging, or of any condition's status or reason, is written at once;
anything else at most once per ``telemetry_min_interval_s`` per car (a battery draining by a tenth of a percent
is not worth an API write). Values are rounded for people. A failed write is retried with backoff; a car whose
VehicleNode is gone is forgotten. Writes only when the body differs from the last one written.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from fleetlet.api.v1alpha1 import Condition, set_condition
from fleetlet.kube import Requeue
from fleetlet.kube.client import ApiError

from .cars import CarRegistry
from .kube import ShimApi
from .metrics import ShimMetrics
from .settings import ShimSettings

_PRECISION = {"stateOfCharge": 4, "batteryTemperatureC": 1, "computeTemperatureC": 1, "linkQuality": 2,
              "energyTodayKWh": 4}


def rounded(telemetry: dict[str, Any]) -> dict[str, Any]:
    """What a person reads in ``kubectl get vn`` (and what decides whether a write is due): no float noise."""
    return {k: round(v, _PRECISION[k]) if k in _PRECISION and isinstance(v, float) else v
            for k, v in telemetry.items()}


MIRROR_DEFERRAL_S = 2.0  # how long a VehicleNode status write waits for urgent writes in flight, at most


class TelemetryMirror:
    def __init__(self, api: ShimApi, registry: CarRegistry, settings: ShimSettings, metrics: ShimMetrics) -> None:
        self.api = api
        self.registry = registry
        self.settings = settings
        self.metrics = metrics
        self._written: dict[str, dict[str, Any]] = {}
        self._written_at: dict[str, float] = {}
        self._urgent: set[str] = set()
        self._conditions: dict[str, list[Condition]] = {}

    def mark(self, car: str, urgent: bool) -> None:
        if urgent:
            self._urgent.add(car)
        else:
            self.metrics.telemetry_coalesced.inc()

    async def sync(self, name: str) -> Requeue | None:
        car = self.registry.get(name)
        vn = self.registry.vehiclenodes.get(name)
        if car is None or vn is None:
            self._forget(name)
            return None
        status: dict[str, Any] = {}
        if car.telemetry is not None:
            status["telemetry"] = rounded(car.telemetry.wire())
        urgent = name in self._urgent
        if car.policy is not None:
            conditions = self._conditions_for(name, vn, car.policy.conditions)
            status["conditions"] = [c.wire() for c in conditions]
            status["taints"] = [{k: v for k, v in (("key", t.key), ("value", t.value), ("effect", t.effect))
                                 if v is not None} for t in car.policy.taints]
        written = self._written.get(name)
        if not status or status == written:
            self._urgent.discard(name)
            return None
        if written is not None and not urgent:
            urgent = _keyed(status.get("conditions")) != _keyed(written.get("conditions")) or (
                status.get("taints") != written.get("taints"))
        elapsed = time.monotonic() - self._written_at.get(name, 0.0)
        if written is not None and not urgent and elapsed < self.settings.telemetry_min_interval_s:
            return Requeue(after=self.settings.telemetry_min_interval_s - elapsed)
        # The mirror is for people and the operator; the scheduler reads the Node. When cars change state in a
        # burst, their taint writes go first (the status is written at most a couple of seconds later).
        await self.api.urgent.quiet(MIRROR_DEFERRAL_S)
        self._urgent.discard(name)
        try:
            await self.api.patch_vehiclenode_status(name, status)
        except ApiError as exc:
            if exc.not_found:
                self._forget(name)
                return None
            if urgent:
                self._urgent.add(name)
            raise
        self._written[name] = status
        self._written_at[name] = time.monotonic()
        self.metrics.telemetry_writes.inc()
        return None

    def _conditions_for(self, name: str, vn: dict[str, Any], wanted: Any) -> list[Condition]:
        current = self._conditions.get(name)
        if current is None:  # first time in this process: continue the transition times already in the API
            current = []
            for raw in (vn.get("status") or {}).get("conditions") or []:
                try:
                    current.append(Condition.model_validate(raw))
                except ValueError:
                    continue
        now = datetime.now(UTC).replace(microsecond=0)
        generation = vn["metadata"].get("generation")
        for c in wanted:
            current = set_condition(current, c.type, c.status, c.reason, c.message, now, generation)
        self._conditions[name] = current
        return current

    def _forget(self, name: str) -> None:
        self._written.pop(name, None)
        self._written_at.pop(name, None)
        self._conditions.pop(name, None)
        self._urgent.discard(name)


def _keyed(conditions: Any) -> list[tuple[Any, Any, Any]]:
    return [(c.get("type"), c.get("status"), c.get("reason")) for c in conditions or []]
