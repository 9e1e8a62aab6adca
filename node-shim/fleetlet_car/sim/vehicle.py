"""``SimulatedVehicle``: the ``VehicleInterface`` of a SIMULATED car (one row of a ``SimulatedFleet``).

What it is for: lets a real ``CarAgent`` and its safety reflex read a simulated car exactly as they would read a
real one, so ``fleetlet-sim``, ``fleetlet-car --simulated``, tests and benchmarks exercise the production code.
Observers hear every physics step and every forced change (``set_drive_state`` ...) synchronously.

What it must never do: be imported by production code (agent, link, reflex, runtime: an import-linter contract
keeps it so), wait on anything inside an observer call, or let one failing observer keep the others (the
safety reflex) from hearing a change.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from ..vehicle import VehicleObserver, VehicleState
from .fleet import SimulatedCar

logger = logging.getLogger(__name__)


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
