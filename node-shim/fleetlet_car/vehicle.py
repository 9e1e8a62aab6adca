"""The small interface a car agent reads its car through: ``VehicleInterface`` and ``VehicleState``.

``VehicleInterface`` is the contract: ``vehicle_id`` names the car; ``state()`` returns the latest
``VehicleState``; ``subscribe(observer)`` calls ``observer(state)`` synchronously, on the thread that saw the
change, for every change of vehicle state (drive state, plug, charge, temperatures), and returns a function that
unsubscribes. An implementation for a real car wraps its vehicle bus; the SIMULATED one
(``fleetlet_car.sim.vehicle.SimulatedVehicle``) adapts a simulated car and lives with the simulator.

This module must never use asyncio, sleep, take a lock held across I/O, touch the network, or import the
simulator (production code reads a car only through this contract): the safety reflex runs inside
``observer`` and the stop path must not wait on anything.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

from fleetlet.api.v1alpha1.vehiclenode import DriveState


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
