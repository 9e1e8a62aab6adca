"""VehicleNode: one per car (cluster-scoped); its Kubernetes Node has the same name.

The owner (or fleet admin) writes spec; the shim writes ``status.telemetry``, the conditions and the taints in
force (computed by ``fleetlet.policy``); the operator writes ``status.trust`` and energy. Only pseudonymous ids
and coarse regions live here: never a VIN or a position.
"""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from .meta import (
    ApiModel,
    Conditions,
    DnsLabel,
    Fraction,
    ObjectMeta,
    Quantity,
    cel,
)
from .taints import Taint

KIND = "VehicleNode"
_VIN = re.compile(r"^[a-hj-npr-z0-9]{17}$")
PLURAL = "vehiclenodes"

# A VIN is 17 characters of [A-HJ-NPR-Z0-9]; a vehicleId shaped like one is refused so none slips in.
_NOT_A_VIN = cel(
    "!self.matches('^[a-hj-npr-z0-9]{17}$')",
    "vehicleId must be a pseudonymous id, not a VIN: use an opaque id such as a hash or UUID",
)


class ConditionType(StrEnum):
    CONNECTED = "Connected"
    PARKED = "Parked"
    BATTERY_OK = "BatteryOK"
    THERMAL_OK = "ThermalOK"
    WITHIN_SCHEDULE = "WithinSchedule"
    SCHEDULABLE = "Schedulable"


class Reason(StrEnum):
    """Condition reasons (CamelCase), shared by the operator and the shim."""

    LINK_UP = "LinkUp"
    LINK_DOWN = "LinkDown"
    NEVER_CONNECTED = "NeverConnected"
    PARKED = "Parked"
    DRIVING = "Driving"
    PREPARING = "PreparingToDrive"
    DRIVE_STATE_UNKNOWN = "DriveStateUnknown"
    CHARGE_OK = "ChargeAboveFloor"
    CHARGE_LOW = "ChargeBelowFloor"
    CHARGE_CRITICAL = "ChargeCritical"
    TEMPERATURE_OK = "TemperatureOK"
    TEMPERATURE_HIGH = "TemperatureAboveSoftLimit"
    OVERHEAT = "TemperatureAboveHardLimit"
    IN_WINDOW = "InsideAvailabilityWindow"
    OUT_OF_WINDOW = "OutsideAvailabilityWindow"
    ENERGY_CAP = "DailyEnergyCapReached"
    OWNER_PAUSED = "PausedByOwner"
    UNPLUGGED = "Unplugged"
    READY = "ReadyForWork"
    ON_BATTERY = "OnBattery"
    NO_TELEMETRY = "NoTelemetry"
    UNTRUSTED = "ResultsFailedVerification"


class Accelerator(ApiModel):
    type: DnsLabel = Field(description="Accelerator type, e.g. 'hw4' or 'orin'; becomes a Node label.")
    count: int = Field(default=1, ge=1, le=16)
    tops: float = Field(default=0.0, ge=0.0, le=10000.0, description="Peak INT8 TOPS of one accelerator.")


class Hardware(ApiModel):
    cpu: Quantity = Field(description="CPU offered to workloads, a Kubernetes quantity (e.g. '4' or '3500m').")
    memory: Quantity = Field(description="Memory offered to workloads (e.g. '8Gi').")
    accelerators: list[Accelerator] = Field(default_factory=list, max_length=4)
    battery_capacity_kwh: float = Field(
        gt=0.0, le=300.0, alias="batteryCapacityKWh", description="Usable pack capacity in kWh."
    )
    compute_power_w: float = Field(
        gt=0.0, le=2000.0, alias="computePowerW", description="Electrical draw of the computer under full load, W."
    )
    idle_power_w: float = Field(
        default=0.0,
        ge=0.0,
        le=2000.0,
        alias="idlePowerW",
        description="Extra draw of staying awake for work (car systems kept on), W; metered as work energy.",
    )


Weekday = Literal["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]
_ALL_DAYS: tuple[Weekday, ...] = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
HHMM = Annotated[str, Field(pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9]$", max_length=5)]


class AvailabilityWindow(ApiModel):
    """Times the owner lends the car; a window may cross midnight (start 22:00, end 06:00)."""

    model_config = ApiModel.model_config | ConfigDict(**{
        "json_schema_extra": {
            "x-kubernetes-validations": [cel("self.start != self.end", "start and end must differ")]
        }
    })

    days: list[Weekday] = Field(
        default_factory=lambda: list(_ALL_DAYS), min_length=1, max_length=7
    )
    start: HHMM
    end: HHMM

    @model_validator(mode="after")
    def _distinct(self) -> AvailabilityWindow:
        if self.start == self.end:
            raise ValueError("start and end must differ")
        return self


class Policy(ApiModel):
    """The owner's rules. Fleetlet never breaks them; the car agent enforces the hard limits itself."""

    model_config = ApiModel.model_config | ConfigDict(**{
        "json_schema_extra": {
            "x-kubernetes-validations": [
                cel(
                    "self.hardMaxBatteryTemperatureC > self.maxBatteryTemperatureC",
                    "hardMaxBatteryTemperatureC must be above maxBatteryTemperatureC (the soft limit)",
                ),
                cel(
                    "self.hardMaxComputeTemperatureC > self.maxComputeTemperatureC",
                    "hardMaxComputeTemperatureC must be above maxComputeTemperatureC (the soft limit)",
                ),
                cel(
                    "self.minStateOfCharge - self.criticalMargin >= self.hardMinStateOfCharge",
                    "minStateOfCharge - criticalMargin must not be below hardMinStateOfCharge",
                ),
            ]
        }
    })

    min_state_of_charge: Fraction = Field(
        default=0.5, description="Battery floor (0..1): no new work under it; hysteresis above it."
    )
    critical_margin: float = Field(
        default=0.05, ge=0.0, le=0.5, description="Work is stopped at minStateOfCharge - criticalMargin."
    )
    hard_min_state_of_charge: Fraction = Field(
        default=0.2, description="Absolute floor: the agent stops work under it, whatever the owner set."
    )
    require_plugged_in: bool = Field(default=True, description="Only lend the car while it is plugged in.")
    max_battery_temperature_c: float = Field(
        default=40.0, ge=-20.0, le=70.0, alias="maxBatteryTemperatureC", description="Soft limit, °C."
    )
    hard_max_battery_temperature_c: float = Field(
        default=50.0, ge=-20.0, le=80.0, alias="hardMaxBatteryTemperatureC", description="Hard limit, °C."
    )
    max_compute_temperature_c: float = Field(
        default=80.0, ge=0.0, le=120.0, alias="maxComputeTemperatureC", description="Soft limit, °C."
    )
    hard_max_compute_temperature_c: float = Field(
        default=95.0, ge=0.0, le=125.0, alias="hardMaxComputeTemperatureC", description="Hard limit, °C."
    )
    availability: list[AvailabilityWindow] = Field(
        default_factory=list, max_length=14, description="When the car may work; empty means any time."
    )
    timezone: str = Field(
        default="UTC", max_length=64, pattern=r"^[A-Za-z_]+(/[A-Za-z0-9_+-]+)*$", description="IANA zone."
    )
    max_energy_per_day_kwh: float = Field(
        default=5.0, ge=0.0, le=200.0, alias="maxEnergyPerDayKWh", description="Work energy cap per local day."
    )

    @model_validator(mode="after")
    def _limits_ordered(self) -> Policy:
        # Mirrors the CEL rules above, so Python callers get the same answer as the API server.
        if self.hard_max_battery_temperature_c <= self.max_battery_temperature_c:
            raise ValueError("hardMaxBatteryTemperatureC must be above maxBatteryTemperatureC (the soft limit)")
        if self.hard_max_compute_temperature_c <= self.max_compute_temperature_c:
            raise ValueError("hardMaxComputeTemperatureC must be above maxComputeTemperatureC (the soft limit)")
        if self.min_state_of_charge - self.critical_margin < self.hard_min_state_of_charge - 1e-9:
            raise ValueError("minStateOfCharge - criticalMargin must not be below hardMinStateOfCharge")
        return self

    @property
    def stop_state_of_charge(self) -> float:
        """Below this the car stops running work (NoExecute): the floor minus the margin, never under the hard floor."""
        return max(self.min_state_of_charge - self.critical_margin, self.hard_min_state_of_charge)


class Owner(ApiModel):
    id: DnsLabel = Field(description="Pseudonymous owner id.")
    payout_share: Fraction = Field(default=0.7, description="Share of the job's price paid to the owner.")


class VehicleNodeSpec(ApiModel):
    vehicle_id: str = Field(
        min_length=3,
        max_length=63,
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        description="Pseudonymous vehicle id (never a VIN).",
        json_schema_extra={"x-kubernetes-validations": [_NOT_A_VIN]},
    )
    owner: Owner
    region: DnsLabel = Field(default="unknown", description="Coarse region (e.g. 'eu-west'); never a position.")
    hardware: Hardware
    policy: Policy = Field(default_factory=Policy)
    paused: bool = Field(default=False, description="Owner opt-out: no new work, running work drains.")

    @field_validator("vehicle_id")
    @classmethod
    def _not_a_vin(cls, value: str) -> str:
        if _VIN.match(value):
            raise ValueError(_NOT_A_VIN["message"])
        return value


DriveState = Literal["Parked", "Preparing", "Driving", "Unknown"]


class Telemetry(ApiModel):
    """What the car last reported (written by the shim, coalesced)."""

    state_of_charge: Fraction
    plugged_in: bool
    charging: bool = False
    drive_state: DriveState
    battery_temperature_c: float = Field(ge=-60.0, le=150.0, alias="batteryTemperatureC")
    compute_temperature_c: float = Field(ge=-60.0, le=150.0, alias="computeTemperatureC")
    link_quality: Fraction = 1.0
    energy_today_kwh: float = Field(
        default=0.0, ge=0.0, le=1000.0, alias="energyTodayKWh",
        description="Work energy the car metered since midnight of energyDay (the owner's time zone), kWh.",
    )
    energy_day: str | None = Field(
        default=None, pattern=r"^\d{4}-\d{2}-\d{2}$", description="The local day energyTodayKWh counts."
    )
    observed_at: datetime


class Energy(ApiModel):
    """Metered work energy and what it earned the owner."""

    day: str | None = Field(default=None, pattern=r"^\d{4}-\d{2}-\d{2}$", description="Local day kWhToday counts.")
    kwh_today: float = Field(default=0.0, ge=0.0, alias="kWhToday")
    kwh_total: float = Field(default=0.0, ge=0.0, alias="kWhTotal")
    battery_wear_cost: float = Field(default=0.0, ge=0.0, description="Estimated battery wear caused, currency units.")
    owner_earnings: float = Field(default=0.0, ge=0.0)
    currency: str = Field(default="EUR", pattern=r"^[A-Z]{3}$")


class Trust(ApiModel):
    """The car's verification record (written by the operator; BOINC-style adaptive replication).

    A car is given unreplicated work only after a run of consecutive valid results; one invalid result resets
    the run and, past ``untrusted``, the shim taints the car ``fleetlet.io/untrusted`` so it gets no work.
    """

    valid_streak: int = Field(default=0, ge=0, description="Consecutive results that agreed with other cars.")
    valid_total: int = Field(default=0, ge=0)
    invalid_total: int = Field(default=0, ge=0)
    untrusted: bool = Field(default=False, description="True: the car gets no work until an admin clears it.")
    last_invalid_at: datetime | None = None
    message: str = Field(default="", max_length=1024)


class VehicleNodeStatus(ApiModel):
    observed_generation: int | None = Field(default=None, ge=0)
    telemetry: Telemetry | None = None
    conditions: Conditions
    taints: list[Taint] = Field(default_factory=list, max_length=16)
    energy: Energy = Field(default_factory=Energy)
    trust: Trust = Field(default_factory=Trust)


class VehicleNode(ApiModel):
    KIND: ClassVar[str] = KIND
    PLURAL: ClassVar[str] = PLURAL
    SCOPE: ClassVar[str] = "Cluster"

    api_version: Literal["fleetlet.io/v1alpha1"] = Field(default="fleetlet.io/v1alpha1")
    kind: Literal["VehicleNode"] = Field(default="VehicleNode")
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: VehicleNodeSpec
    status: VehicleNodeStatus | None = None

    @classmethod
    def from_kube(cls, body: dict[str, Any]) -> VehicleNode:
        return cls.model_validate(body)


PRINTER_COLUMNS: list[dict[str, Any]] = [
    {"name": "Region", "type": "string", "jsonPath": ".spec.region"},
    {"name": "SoC", "type": "number", "jsonPath": ".status.telemetry.stateOfCharge", "description": "State of charge (0..1)"},
    {"name": "Plugged", "type": "boolean", "jsonPath": ".status.telemetry.pluggedIn"},
    {"name": "Drive", "type": "string", "jsonPath": ".status.telemetry.driveState"},
    {"name": "Connected", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Connected")].status'},
    {"name": "Schedulable", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Schedulable")].status'},
    {"name": "Reason", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Schedulable")].reason', "priority": 1},
    {"name": "kWh-Today", "type": "number", "jsonPath": ".status.energy.kWhToday", "priority": 1},
    {"name": "Earnings", "type": "number", "jsonPath": ".status.energy.ownerEarnings", "priority": 1},
    {"name": "Paused", "type": "boolean", "jsonPath": ".spec.paused", "priority": 1},
    {"name": "Untrusted", "type": "boolean", "jsonPath": ".status.trust.untrusted", "priority": 1},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]
SHORT_NAMES = ["vn", "vnode"]
