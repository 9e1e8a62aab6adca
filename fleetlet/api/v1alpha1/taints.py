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
UNPLUGGED = PREFIX + "unplugged"  # NoSchedule: jobs that may run on battery tolerate it (see its values)
OFF_HOURS = PREFIX + "off-hours"  # NoSchedule: outside the owner's availability window
ENERGY_CAP = PREFIX + "energy-cap"  # NoSchedule: the owner's energy cap for the local day is reached
UNTRUSTED = PREFIX + "untrusted"  # NoSchedule: results failed verification; no work until trusted again

TAINT_EFFECTS: dict[str, TaintEffect] = {
    VEHICLE: "NoSchedule",
    DRIVING: "NoExecute",
    BATTERY_LOW: "NoSchedule",
    BATTERY_CRITICAL: "NoExecute",
    THERMAL: "NoSchedule",
    OVERHEAT: "NoExecute",
    UNPLUGGED: "NoSchedule",
    OFF_HOURS: "NoSchedule",
    ENERGY_CAP: "NoSchedule",
    UNTRUSTED: "NoSchedule",
}
# The car-state taints the shim computes from telemetry and the owner's policy (all but the vehicle marker).
CAR_STATE_TAINTS: tuple[str, ...] = tuple(k for k in TAINT_EFFECTS if k != VEHICLE)

# Values of the unplugged taint. A job that may run on battery tolerates only ON_BATTERY (operator Equal): when
# the owner lends the car only while plugged in, the taint says OWNER_REQUIRES_PLUG and no shard tolerates it.
UNPLUGGED_ON_BATTERY = "on-battery"
UNPLUGGED_OWNER_REQUIRES_PLUG = "owner-requires-plug"

# Labels. The shim owns all of them on a car's Node.
LABEL_VEHICLE = PREFIX + "vehicle"  # "true" on every car Node (selectors, affinity)
LABEL_ACCELERATOR = PREFIX + "accelerator"  # accelerator type, e.g. "hw4" or "none"
LABEL_REGION = "topology.kubernetes.io/region"  # coarse region, never a position
LABEL_OWNER = PREFIX + "owner"  # pseudonymous owner id: replicas of a shard spread across owners
LABEL_SOC_BAND = PREFIX + "soc-band"  # state-of-charge decile "0".."10" (70 % .. 79 % -> "7"); follows telemetry
LABEL_PLUGGED_IN = PREFIX + "plugged-in"  # "true" | "false"; follows telemetry
LABEL_SHIM = PREFIX + "shim"  # which shim replica serves the car

# Extended resource advertised in Node capacity when the car has an accelerator.
RESOURCE_ACCELERATOR = PREFIX + "accelerator"

# RuntimeClass names a shard pod may use; the shim refuses anything else.
RUNTIME_CLASS_ONNX = "fleetlet-onnx"


def soc_band(state_of_charge: float) -> int:
    """The decile label value of a state of charge (0..1): 0.79 -> 7, 1.0 -> 10."""
    return max(0, min(10, int(state_of_charge * 10 + 1e-9)))


class Taint(ApiModel):
    """A taint in force on the car's Node, as recorded in VehicleNode status."""

    key: str = Field(pattern=r"^fleetlet\.io/[a-z0-9-]+$|^node\.kubernetes\.io/[a-z0-9-]+$", max_length=253)
    value: str | None = Field(default=None, max_length=63)
    effect: TaintEffect
