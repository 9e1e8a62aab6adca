"""The SIMULATED car and fleet: physics, schedules and links for cars that do not exist.

Used by ``fleetlet-sim`` (many simulated agents), by tests and by benchmarks. Nothing here may ever be used to
make a decision about a real car; a real agent reads its car through ``fleetlet_car.vehicle``.
"""

from .connectivity import ConnectivityConfig, ConnectivityModel
from .fleet import (
    DEFAULT_START,
    DRIVE_STATES,
    HARDWARE_MIX,
    CarTraits,
    DriveStateChange,
    SimulatedCar,
    SimulatedFleet,
    make_vehicle_specs,
)
from .physics import Climate
from .schedule import DaySchedule, DriverHabits, DriverProfile, DrivingSchedule, Legs
from .vehicle import SimulatedVehicle

__all__ = [
    "DEFAULT_START",
    "DRIVE_STATES",
    "HARDWARE_MIX",
    "CarTraits",
    "Climate",
    "ConnectivityConfig",
    "ConnectivityModel",
    "DaySchedule",
    "DriveStateChange",
    "DriverHabits",
    "DriverProfile",
    "DrivingSchedule",
    "Legs",
    "SimulatedCar",
    "SimulatedFleet",
    "SimulatedVehicle",
    "make_vehicle_specs",
]
