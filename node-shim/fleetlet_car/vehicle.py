"""The small interface a car agent reads its car through, and its SIMULATED implementation.

``VehicleInterface`` is the contract: ``vehicle_id`` names the car; ``state()`` returns the latest ``VehicleState``; ``subscribe(observer)``
calls ``observer(state)`` synchronously, on the thread that saw the change, for every change of vehicle state
(drive state, plug, charge, temperatures), and returns a function that unsubscribes. An implementation for a
real car wraps its vehicle bus; ``SimulatedVehicle`` adapts one ``SimulatedCar``.

This module must never use asyncio, sleep, take a lock held across I/O, or touch the network: the safety
reflex runs inside ``observer`` and the stop path must not wait on anything.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

from fleetlet.api.v1alpha1.vehiclenode import DriveState

from .sim.fleet import SimulatedCar

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class VehicleState:
    """One reading of the car. ``changed_at_ns`` is ``time.perf_counter_ns()`` when the change was seen."""

    state_of_charge: float
    plugged_in: bool
    charging: bool
    drive_state: DriveState
    battery_temperature_c: float
    compute_temperature_c: float
    link_quality: float
    observed_at: datetime
    changed_at_ns: int

    @property
    def parked(self) -> bool:
        return self.drive_state == "Parked"

    def telemetry(self) -> dict[str, Any]:
        """The reading as a ``Telemetry``-compatible dict (camelCase, JSON-ready)."""
        return {
            "stateOfCharge": self.state_of_charge,
            "pluggedIn": self.plugged_in,
            "charging": self.charging,
            "driveState": self.drive_state,
            "batteryTemperatureC": self.battery_temperature_c,
            "computeTemperatureC": self.compute_temperature_c,
            "linkQuality": self.link_quality,
            "observedAt": self.observed_at.isoformat(),
        }


VehicleObserver = Callable[[VehicleState], None]


@runtime_checkable
class VehicleInterface(Protocol):
    """What a car agent reads. Observers are called synchronously; they must be quick and must not block."""

    @property
    def vehicle_id(self) -> str: ...

    def state(self) -> VehicleState: ...

    def subscribe(self, observer: VehicleObserver, *, first: bool = False) -> Callable[[], None]:
        """Call ``observer`` on every change; ``first`` puts it ahead of the others (the safety reflex)."""
        ...


class SimulatedVehicle:
    """``VehicleInterface`` over one ``SimulatedCar``: observers hear every step and every forced change."""

    def __init__(self, car: SimulatedCar) -> None:
        self._car = car
        self._observers: list[VehicleObserver] = []
        self._unwatch: Callable[[], None] | None = None

    @property
    def vehicle_id(self) -> str:
        return self._car.vehicle_id

    @property
    def car(self) -> SimulatedCar:
        return self._car

    def state(self, changed_at_ns: int = 0) -> VehicleState:
        f, i = self._car.fleet, self._car.index
        return VehicleState(
            state_of_charge=float(f.state_of_charge[i]),
            plugged_in=bool(f.plugged_in[i]),
            charging=bool(f.charging[i]),
            drive_state=self._car.drive_state,
            battery_temperature_c=float(f.battery_temperature_c[i]),
            compute_temperature_c=float(f.compute_temperature_c[i]),
            link_quality=float(f.link_quality[i]),
            observed_at=f.now,
            changed_at_ns=changed_at_ns,
        )

    def subscribe(self, observer: VehicleObserver, *, first: bool = False) -> Callable[[], None]:
        if first:
            self._observers.insert(0, observer)
        else:
            self._observers.append(observer)
        if self._unwatch is None:
            self._unwatch = self._car.watch(self._on_change)

        def unsubscribe() -> None:
            if observer in self._observers:
                self._observers.remove(observer)
            if not self._observers and self._unwatch is not None:
                self._unwatch()
                self._unwatch = None

        return unsubscribe

    def _on_change(self, _index: int, changed_at_ns: int) -> None:
        state = self.state(changed_at_ns)
        for observer in tuple(self._observers):
            try:
                observer(state)
            except Exception:  # an observer's bug must not keep the others (the reflex) from hearing
                logger.exception("vehicle observer failed on %s", self.vehicle_id)
