"""fleetlet.io/v1alpha1: the models every component shares. Import from here, not from the submodules."""

from . import fleetjob, taints, vehiclenode
from .fleetjob import FleetJob, FleetJobSpec, FleetJobStatus
from .meta import API_VERSION, GROUP, VERSION, Condition, get_condition, set_condition
from .vehiclenode import Telemetry, VehicleNode, VehicleNodeSpec, VehicleNodeStatus

KINDS = (VehicleNode, FleetJob)

__all__ = [
    "API_VERSION",
    "GROUP",
    "KINDS",
    "VERSION",
    "Condition",
    "FleetJob",
    "FleetJobSpec",
    "FleetJobStatus",
    "Telemetry",
    "VehicleNode",
    "VehicleNodeSpec",
    "VehicleNodeStatus",
    "fleetjob",
    "get_condition",
    "set_condition",
    "taints",
    "vehiclenode",
]
