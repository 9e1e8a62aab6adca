"""The ``fleetlet.io/*`` taint and label keys: fixed names shared by the operator, the shim and users' tolerations."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .meta import ApiModel

PREFIX = "fleetlet.io/"

TaintEffect = Literal["NoSchedule", "PreferNoSchedule", "NoExecute"]

# Taint keys (ARCHITECTURE.md, "Taints and labels").
VEHICLE = PREFIX + "vehicle"  # NoSchedule, always: ordinary pods never land on a car
DRIVING = PREFIX + "driving"  # NoExecute: the car is not parked
BATTERY_LOW = PREFIX + "battery-low"  # NoSchedule: under the owner's floor (with hysteresis)
BATTERY_CRITICAL = PREFIX + "battery-critical"  # NoExecute: under floor - margin, or the hard floor
THERMAL = PREFIX + "thermal"  # NoSchedule: over the soft temperature limit
OVERHEAT = PREFIX + "overheat"  # NoExecute: over the hard limit
UNPLUGGED = PREFIX + "unplugged"  # NoSchedule: jobs that may run on battery tolerate it
OFF_HOURS = PREFIX + "off-hours"  # NoSchedule: outside the owner's availability window

TAINT_EFFECTS: dict[str, TaintEffect] = {
    VEHICLE: "NoSchedule",
    DRIVING: "NoExecute",
    BATTERY_LOW: "NoSchedule",
    BATTERY_CRITICAL: "NoExecute",
    THERMAL: "NoSchedule",
    OVERHEAT: "NoExecute",
    UNPLUGGED: "NoSchedule",
    OFF_HOURS: "NoSchedule",
}

# Labels. The shim owns the ones describing the car; the operator owns the ones that follow telemetry.
LABEL_VEHICLE = PREFIX + "vehicle"  # "true" on every car Node (selectors, affinity)
LABEL_ACCELERATOR = PREFIX + "accelerator"  # accelerator type, e.g. "hw4" or "none"
LABEL_REGION = "topology.kubernetes.io/region"  # coarse region, never a position
LABEL_SOC_BAND = PREFIX + "soc-band"  # operator: "high" | "mid" | "low"
LABEL_PLUGGED_IN = PREFIX + "plugged-in"  # operator: "true" | "false"
LABEL_SHIM = PREFIX + "shim"  # which shim replica serves the car

# Extended resource advertised in Node capacity when the car has an accelerator.
RESOURCE_ACCELERATOR = PREFIX + "accelerator"

# RuntimeClass names a shard pod may use; the shim refuses anything else.
RUNTIME_CLASS_ONNX = "fleetlet-onnx"


class Taint(ApiModel):
    """A taint in force on the car's Node, as recorded in VehicleNode status."""

    key: str = Field(pattern=r"^fleetlet\.io/[a-z0-9-]+$|^node\.kubernetes\.io/[a-z0-9-]+$", max_length=253)
    effect: TaintEffect
