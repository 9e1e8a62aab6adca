"""The owner's rules as one pure function: policy + telemetry + time -> taints, labels, cordon and conditions.

``evaluate`` is the one place Fleetlet decides what a car may do. The shim applies its result to the car's
Node (the car-state ``fleetlet.io/*`` taints, the labels that follow telemetry, ``spec.unschedulable``) and to
the VehicleNode's conditions; the car agent runs the same function on its own readings to refuse new work that
breaks its owner's rules (``CarPolicy.blocking``) and to drain running work when a rule starts forbidding it
(``CarPolicy.must_drain``). One implementation, so the cluster and the car never disagree about the rules.

Hysteresis needs memory, and the function keeps none: the caller passes the previous result back in (or,
after a restart, ``CarPolicy.observed`` rebuilt from the Node). Time comes in as ``now``; ``next_check_at``
says when the answer would change with no new reading, so callers can set a timer instead of polling.

It must never do I/O, read the clock, log, keep state between calls (the memos of time-zone lookups and of
window instants per local day are the only caches, and they are invisible), or raise on an owner's bad time
zone. With no telemetry it must never drop a taint that came from the car's readings: a restart must not open
a car to work it cannot take. It runs on every telemetry report of thousands of cars, so it stays a handful of
comparisons and memoised lookups, with no datetime arithmetic beyond a few conversions per new local day.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from types import MappingProxyType
from typing import Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from fleetlet.api.v1alpha1 import taints as tk
from fleetlet.api.v1alpha1.meta import ConditionStatus
from fleetlet.api.v1alpha1.taints import TaintEffect
from fleetlet.api.v1alpha1.vehiclenode import AvailabilityWindow, ConditionType, Policy, Reason, Telemetry

__all__ = ["CarPolicy", "Hysteresis", "PolicyCondition", "PolicyTaint", "evaluate"]


class _R:
    """``Reason`` values as plain str. Enum attribute access showed up in the profile of this hot path, and a
    plain str serialises anywhere (YAML's safe dumper refuses str subclasses)."""

    CHARGE_CRITICAL: Final = Reason.CHARGE_CRITICAL.value
    CHARGE_LOW: Final = Reason.CHARGE_LOW.value
    CHARGE_OK: Final = Reason.CHARGE_OK.value
    DRIVE_STATE_UNKNOWN: Final = Reason.DRIVE_STATE_UNKNOWN.value
    DRIVING: Final = Reason.DRIVING.value
    ENERGY_CAP: Final = Reason.ENERGY_CAP.value
    IN_WINDOW: Final = Reason.IN_WINDOW.value
    LINK_DOWN: Final = Reason.LINK_DOWN.value
    LINK_UP: Final = Reason.LINK_UP.value
    NO_TELEMETRY: Final = Reason.NO_TELEMETRY.value
    ON_BATTERY: Final = Reason.ON_BATTERY.value
    OUT_OF_WINDOW: Final = Reason.OUT_OF_WINDOW.value
    OVERHEAT: Final = Reason.OVERHEAT.value
    OWNER_PAUSED: Final = Reason.OWNER_PAUSED.value
    PARKED: Final = Reason.PARKED.value
    PREPARING: Final = Reason.PREPARING.value
    READY: Final = Reason.READY.value
    TEMPERATURE_HIGH: Final = Reason.TEMPERATURE_HIGH.value
    TEMPERATURE_OK: Final = Reason.TEMPERATURE_OK.value
    UNPLUGGED: Final = Reason.UNPLUGGED.value
    UNTRUSTED: Final = Reason.UNTRUSTED.value


class _T:
    """``ConditionType`` values as plain str, for the same reasons."""

    CONNECTED: Final = ConditionType.CONNECTED.value
    PARKED: Final = ConditionType.PARKED.value
    BATTERY_OK: Final = ConditionType.BATTERY_OK.value
    THERMAL_OK: Final = ConditionType.THERMAL_OK.value
    WITHIN_SCHEDULE: Final = ConditionType.WITHIN_SCHEDULE.value
    SCHEDULABLE: Final = ConditionType.SCHEDULABLE.value


# Readings arrive as decimal fractions (0.47) while thresholds are sums of floats (0.45 + 0.02 is
# 0.47000000000000003): a reading equal to a threshold on paper must compare as equal.
_EPS = 1e-9
# The car's reflex resumes no sooner than 3 °C under a hard limit; the taint must not clear before it does.
_MIN_OVERHEAT_HYSTERESIS_C = 3.0

_CAR_STATE_TAINTS = frozenset(tk.CAR_STATE_TAINTS)
# Taints that follow the car's readings: kept from ``previous`` while there is no telemetry.
_TELEMETRY_TAINTS = frozenset(
    {tk.DRIVING, tk.BATTERY_LOW, tk.BATTERY_CRITICAL, tk.THERMAL, tk.OVERHEAT, tk.UNPLUGGED}
)
_TELEMETRY_LABELS = (tk.LABEL_SOC_BAND, tk.LABEL_PLUGGED_IN)
_DRIVE_REASONS: Mapping[str, str] = {
    "Preparing": _R.PREPARING,
    "Driving": _R.DRIVING,
    "Unknown": _R.DRIVE_STATE_UNKNOWN,
}
_DRIVE_WORDS: Mapping[str, str] = {
    "Preparing": "the car is preparing to drive",
    "Driving": "the car is driving",
    "Unknown": "the car's drive state is unknown, so it counts as not parked",
}
_DRAIN_REASONS = frozenset({_R.OWNER_PAUSED, _R.OUT_OF_WINDOW, _R.ENERGY_CAP})
_WEEKDAYS: Mapping[str, int] = {"Mon": 0, "Tue": 1, "Wed": 2, "Thu": 3, "Fri": 4, "Sat": 5, "Sun": 6}
_CONDITION_ORDER = tuple(c.value for c in ConditionType)


@dataclass(frozen=True, slots=True)
class PolicyTaint:
    """A car-state taint in force (never ``fleetlet.io/vehicle``, which the shim sets at registration)."""

    key: str
    effect: TaintEffect
    # Only the unplugged taint has a value: UNPLUGGED_ON_BATTERY or UNPLUGGED_OWNER_REQUIRES_PLUG.
    value: str | None = None


@dataclass(frozen=True, slots=True)
class PolicyCondition:
    """One VehicleNode condition, without the times the shim stamps on it."""

    type: str
    status: ConditionStatus
    reason: str
    message: str


@dataclass(frozen=True, slots=True)
class Hysteresis:
    """How far a reading must come back before a taint clears, so a reading wobbling at a limit flaps nothing.

    A taint is set the moment its limit is crossed and cleared only past the clear level: battery-low at the
    floor + ``soc``, battery-critical at the stop floor + ``soc``, thermal at the soft limit -
    ``temperature_c``, overheat at the hard limit - ``max(temperature_c, 3.0)`` (the car's reflex resumes no
    sooner). The soc-band label moves to another decile only once the state of charge is ``band`` inside it.
    """

    soc: float = 0.02
    temperature_c: float = 2.0
    band: float = 0.01


_DEFAULT_HYSTERESIS = Hysteresis()


@dataclass(frozen=True)
class CarPolicy:
    """What the owner's rules make of a car right now.

    ``conditions``: all six, in ``ConditionType`` order. ``taints``: the car-state taints in force, sorted by
    key. ``labels``: ``LABEL_SOC_BAND`` and ``LABEL_PLUGGED_IN`` (empty before the first telemetry).
    ``cordoned``: the owner paused the car (the Node gets ``spec.unschedulable``). ``next_check_at``: the next
    instant the result can change by time alone (an availability-window boundary, or local midnight while the
    energy cap holds), strictly after ``now``; None when nothing is time-driven.
    """

    conditions: tuple[PolicyCondition, ...]
    taints: tuple[PolicyTaint, ...]
    labels: Mapping[str, str]
    cordoned: bool
    next_check_at: datetime | None

    def condition(self, type_: str) -> PolicyCondition:
        for condition in self.conditions:
            if condition.type == type_:
                return condition
        raise KeyError(type_)

    @property
    def schedulable(self) -> bool:
        return self.condition(_T.SCHEDULABLE).status == "True"

    def taint_keys(self) -> frozenset[str]:
        return frozenset(taint.key for taint in self.taints)

    def blocking(self) -> tuple[str, ...]:
        """Reasons the owner's rules forbid starting new work now, most important first; empty: work allowed.

        Not untrusted (the operator's concern, not the owner's) and not unplugged when the owner allows work
        on battery (whether a job may run on battery is the job's choice). Missing telemetry blocks: the rules
        cannot be checked without it.
        """
        return tuple(r for r in self._no_work_reasons() if r != _R.UNTRUSTED)

    def must_drain(self) -> tuple[str, ...]:
        """Reasons running work must checkpoint and stop now: paused, off-hours, energy cap.

        Driving, critical charge, overheat and a required plug pulled are the reflex's immediate kills on the
        car, not a graceful drain, so they are not listed here.
        """
        return tuple(r for r in self._no_work_reasons() if r in _DRAIN_REASONS)

    def _no_work_reasons(self) -> list[str]:
        parked = self.condition(_T.PARKED)
        drive_reason = parked.reason if parked.reason in _DRIVE_REASONS.values() else _R.DRIVING
        return _no_work_reasons(
            {taint.key: taint.value for taint in self.taints},
            cordoned=self.cordoned,
            drive_reason=drive_reason,
            no_telemetry=parked.reason == _R.NO_TELEMETRY,
        )

    @classmethod
    def observed(cls, taints: Iterable[tuple[str, str | None, str]], labels: Mapping[str, str]) -> CarPolicy:
        """A stand-in for the previous result, rebuilt from a Node's (key, value, effect) taints and labels.

        Only the hysteresis memory is real: the car-state taints and the telemetry labels. Everything else on
        the Node (the vehicle marker, the kube-controller-manager's taints, other labels) is ignored, and the
        conditions are placeholders, so use it only as ``previous``.
        """
        found: dict[str, PolicyTaint] = {}
        for key, value, _effect in taints:
            if key in _CAR_STATE_TAINTS and key not in found:
                # The effect is ours to decide, so a hand-edited one is not carried over.
                found[key] = PolicyTaint(key, tk.TAINT_EFFECTS[key], value if key == tk.UNPLUGGED else None)
        message = "rebuilt from the Node after a restart; not evaluated yet"
        return cls(
            conditions=tuple(
                PolicyCondition(type_, "Unknown", _R.NO_TELEMETRY, message) for type_ in _CONDITION_ORDER
            ),
            taints=tuple(found[key] for key in sorted(found)),
            labels=MappingProxyType({k: labels[k] for k in _TELEMETRY_LABELS if k in labels}),
            cordoned=False,
            next_check_at=None,
        )


def _no_work_reasons(
    taints: Mapping[str, str | None], *, cordoned: bool, drive_reason: str, no_telemetry: bool
) -> list[str]:
    """Every reason the car takes no new work (the link aside), in the order Schedulable reports them."""
    out: list[str] = []
    if tk.DRIVING in taints:
        out.append(drive_reason)
    if tk.BATTERY_CRITICAL in taints:
        out.append(_R.CHARGE_CRITICAL)
    if tk.OVERHEAT in taints:
        out.append(_R.OVERHEAT)
    if cordoned:
        out.append(_R.OWNER_PAUSED)
    if tk.OFF_HOURS in taints:
        out.append(_R.OUT_OF_WINDOW)
    if tk.ENERGY_CAP in taints:
        out.append(_R.ENERGY_CAP)
    if tk.BATTERY_LOW in taints:
        out.append(_R.CHARGE_LOW)
    if tk.THERMAL in taints:
        out.append(_R.TEMPERATURE_HIGH)
    # Any value but on-battery (a hand-edited one included) is read as the owner's plug rule: fail closed.
    if tk.UNPLUGGED in taints and taints[tk.UNPLUGGED] != tk.UNPLUGGED_ON_BATTERY:
        out.append(_R.UNPLUGGED)
    if tk.UNTRUSTED in taints:
        out.append(_R.UNTRUSTED)
    if no_telemetry:
        out.append(_R.NO_TELEMETRY)
    return out


def evaluate(
    policy: Policy,
    telemetry: Telemetry | None,
    *,
    now: datetime,
    paused: bool = False,
    connected: bool = True,
    trusted: bool = True,
    previous: CarPolicy | None = None,
    hysteresis: Hysteresis = _DEFAULT_HYSTERESIS,
) -> CarPolicy:
    """Apply the owner's ``policy`` to the car's last ``telemetry`` at ``now`` (timezone-aware).

    ``paused``: the owner's opt-out (spec.paused). ``connected``: the car link is up. ``trusted``: the
    operator's verdict on the car's results. ``previous``: the last result for this car, the memory that
    hysteresis needs.
    """
    if now.utcoffset() is None:
        raise ValueError("now must be timezone-aware, e.g. datetime.now(UTC)")
    zone, zone_known = _zone(policy.timezone)
    zone_name = policy.timezone if zone_known else "UTC"
    today = now.astimezone(zone).date()
    before: Mapping[str, str | None] = (
        {t.key: t.value for t in previous.taints} if previous is not None else {}
    )
    h = hysteresis

    in_force: dict[str, str | None] = {}
    words: dict[str, str] = {}  # reason -> the blocker in words, for Schedulable's message
    unplugged_value = (
        tk.UNPLUGGED_OWNER_REQUIRES_PLUG if policy.require_plugged_in else tk.UNPLUGGED_ON_BATTERY
    )

    # --- readings: driving, battery, temperature, plug ------------------------------------------------------
    if telemetry is not None:
        car = _read(policy, telemetry, before, h)
        for key, on in (
            (tk.DRIVING, car.driving),
            (tk.BATTERY_LOW, car.low),
            (tk.BATTERY_CRITICAL, car.critical),
            (tk.THERMAL, car.thermal),
            (tk.OVERHEAT, car.overheat),
        ):
            if on:
                in_force[key] = None
        if not telemetry.plugged_in:
            in_force[tk.UNPLUGGED] = unplugged_value
        words[_R.UNPLUGGED] = "the car is unplugged and the owner lends it only while plugged in"
        parked = _parked_condition(telemetry)
        battery = _battery_condition(policy, telemetry.state_of_charge, car, h)
        thermal = _thermal_condition(policy, telemetry, car, h)
        drive_reason = parked.reason if car.driving else _R.DRIVING
        words[drive_reason] = parked.message
        words[_R.CHARGE_CRITICAL] = words[_R.CHARGE_LOW] = battery.message
        words[_R.OVERHEAT] = words[_R.TEMPERATURE_HIGH] = thermal.message
        labels = {
            tk.LABEL_SOC_BAND: _soc_band_label(
                telemetry.state_of_charge,
                previous.labels.get(tk.LABEL_SOC_BAND) if previous else None,
                h.band,
            ),
            tk.LABEL_PLUGGED_IN: "true" if telemetry.plugged_in else "false",
        }
    else:
        # Keep what the last readings forbade; the plug value follows the owner's current rule.
        for key in _TELEMETRY_TAINTS.intersection(before):
            in_force[key] = unplugged_value if key == tk.UNPLUGGED else None
        parked = _unknown(_T.PARKED, in_force, (tk.DRIVING,))
        battery = _unknown(_T.BATTERY_OK, in_force, (tk.BATTERY_CRITICAL, tk.BATTERY_LOW))
        thermal = _unknown(_T.THERMAL_OK, in_force, (tk.OVERHEAT, tk.THERMAL))
        drive_reason = _R.DRIVING
        for reason, key in (
            (drive_reason, tk.DRIVING),
            (_R.CHARGE_CRITICAL, tk.BATTERY_CRITICAL),
            (_R.OVERHEAT, tk.OVERHEAT),
            (_R.CHARGE_LOW, tk.BATTERY_LOW),
            (_R.TEMPERATURE_HIGH, tk.THERMAL),
        ):
            words[reason] = f"{key} kept from the car's last known state until it reports again"
        words[_R.NO_TELEMETRY] = "no telemetry from the car yet"
        words[_R.UNPLUGGED] = (
            f"{tk.UNPLUGGED} kept from the car's last known state: unplugged, and the owner lends it only"
            " while plugged in"
        )
        labels = (
            {k: previous.labels[k] for k in _TELEMETRY_LABELS if k in previous.labels} if previous else {}
        )

    # --- the owner's hours ----------------------------------------------------------------------------------
    schedule = _schedule(policy.availability, zone, now, today)
    if not schedule.inside:
        in_force[tk.OFF_HOURS] = None
    within = _schedule_condition(policy, schedule, zone, zone_name, zone_known, now)
    words[_R.OUT_OF_WINDOW] = within.message

    # --- the owner's energy per local day -------------------------------------------------------------------
    energy = 0.0
    if telemetry is not None and telemetry.energy_day == today.isoformat():
        energy = telemetry.energy_today_kwh
    midnight: datetime | None = None
    if energy >= policy.max_energy_per_day_kwh - _EPS:
        in_force[tk.ENERGY_CAP] = None
        midnight = _instant(zone, today + timedelta(days=1), time(0, 0))
        words[_R.ENERGY_CAP] = (
            f"today's work energy {_kwh(energy)} reached the owner's cap of"
            f" {_kwh(policy.max_energy_per_day_kwh)} for {today.isoformat()} ({zone_name});"
            f" the day rolls over at {_local(midnight, zone)}"
        )

    # --- trust and pause ------------------------------------------------------------------------------------
    if not trusted:
        in_force[tk.UNTRUSTED] = None
        words[_R.UNTRUSTED] = "the car's results failed verification: no work until it is trusted again"
    words[_R.OWNER_PAUSED] = "the owner paused the car: no new work, running work drains"
    words[_R.LINK_DOWN] = "the link to the car is down"

    reasons = _no_work_reasons(
        in_force, cordoned=paused, drive_reason=drive_reason, no_telemetry=telemetry is None
    )
    if not connected:
        reasons.insert(0, _R.LINK_DOWN)
    conditions = (
        PolicyCondition(
            _T.CONNECTED,
            "True" if connected else "False",
            _R.LINK_UP if connected else _R.LINK_DOWN,
            "the car link is up"
            if connected
            else "the link to the car is down: no new work until it reconnects",
        ),
        parked,
        battery,
        thermal,
        within,
        _schedulable_condition(reasons, words, in_force.get(tk.UNPLUGGED, None)),
    )
    return CarPolicy(
        conditions=conditions,
        taints=tuple(PolicyTaint(key, tk.TAINT_EFFECTS[key], in_force[key]) for key in sorted(in_force)),
        labels=MappingProxyType(labels),
        cordoned=paused,
        next_check_at=_earliest(schedule.next_boundary, midnight),
    )


# --- readings -----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _CarState:
    driving: bool
    critical: bool
    low: bool
    overheat: bool
    thermal: bool


def _read(policy: Policy, telemetry: Telemetry, before: Mapping[str, str | None], h: Hysteresis) -> _CarState:
    soc = telemetry.state_of_charge
    floor, stop = policy.min_state_of_charge, policy.stop_state_of_charge
    critical = soc < stop - _EPS or (tk.BATTERY_CRITICAL in before and soc < _soc_clear(stop, h) - _EPS)
    # Under the stop floor is under the owner's floor too, whatever the margins make of the clear levels.
    low = critical or soc < floor - _EPS or (tk.BATTERY_LOW in before and soc < _soc_clear(floor, h) - _EPS)

    bt, ct = telemetry.battery_temperature_c, telemetry.compute_temperature_c
    hard_b, hard_c = policy.hard_max_battery_temperature_c, policy.hard_max_compute_temperature_c
    soft_b, soft_c = policy.max_battery_temperature_c, policy.max_compute_temperature_c
    cool = _overheat_hysteresis(h)
    overheat = bt > hard_b + _EPS or ct > hard_c + _EPS
    if not overheat and tk.OVERHEAT in before:
        overheat = bt > hard_b - cool + _EPS or ct > hard_c - cool + _EPS
    thermal = overheat or bt > soft_b + _EPS or ct > soft_c + _EPS
    if not thermal and tk.THERMAL in before:
        thermal = bt > soft_b - h.temperature_c + _EPS or ct > soft_c - h.temperature_c + _EPS
    return _CarState(
        driving=telemetry.drive_state != "Parked",
        critical=critical,
        low=low,
        overheat=overheat,
        thermal=thermal,
    )


def _soc_clear(threshold: float, h: Hysteresis) -> float:
    # Capped at a full battery: an owner's floor of 100 % must still clear once the car is full.
    return min(1.0, threshold + h.soc)


def _overheat_hysteresis(h: Hysteresis) -> float:
    return max(h.temperature_c, _MIN_OVERHEAT_HYSTERESIS_C)


def _parked_condition(telemetry: Telemetry) -> PolicyCondition:
    state = telemetry.drive_state
    if state == "Parked":
        return PolicyCondition(_T.PARKED, "True", _R.PARKED, "the car is parked")
    return PolicyCondition(
        _T.PARKED,
        "False",
        _DRIVE_REASONS[state],
        f"{_DRIVE_WORDS[state]}: running work stops and no new work lands until it reports Parked",
    )


def _battery_condition(policy: Policy, soc: float, car: _CarState, h: Hysteresis) -> PolicyCondition:
    floor, stop = policy.min_state_of_charge, policy.stop_state_of_charge
    resume = _soc_clear(floor, h)
    type_ = _T.BATTERY_OK
    if car.critical:
        if soc < stop - _EPS:
            head = f"state of charge {_pct(soc)} is under the stop floor of {_pct(stop)}: running work stops"
        else:
            head = (
                f"state of charge {_pct(soc)} is back at the stop floor of {_pct(stop)}"
                " but still counts as critical"
            )
        return PolicyCondition(
            type_,
            "False",
            _R.CHARGE_CRITICAL,
            f"{head}; work may run again from {_pct(_soc_clear(stop, h))}"
            f" and new work resumes at {_pct(resume)}"
            f" (owner's floor {_pct(floor)}, critical margin {_pct(policy.critical_margin)},"
            f" hard floor {_pct(policy.hard_min_state_of_charge)})",
        )
    if car.low:
        if soc < floor - _EPS:
            message = (
                f"state of charge {_pct(soc)} is under the owner's floor of {_pct(floor)};"
                f" new work resumes at {_pct(resume)}"
            )
        else:
            message = (
                f"state of charge {_pct(soc)} is back at the owner's floor of {_pct(floor)}"
                f" but new work resumes only at {_pct(resume)}"
            )
        return PolicyCondition(type_, "False", _R.CHARGE_LOW, message)
    return PolicyCondition(
        type_,
        "True",
        _R.CHARGE_OK,
        f"state of charge {_pct(soc)} is at or over the owner's floor of {_pct(floor)}",
    )


def _thermal_condition(
    policy: Policy, telemetry: Telemetry, car: _CarState, h: Hysteresis
) -> PolicyCondition:
    sensors = (
        (
            "battery",
            telemetry.battery_temperature_c,
            policy.max_battery_temperature_c,
            policy.hard_max_battery_temperature_c,
        ),
        (
            "compute",
            telemetry.compute_temperature_c,
            policy.max_compute_temperature_c,
            policy.hard_max_compute_temperature_c,
        ),
    )
    type_ = _T.THERMAL_OK
    if car.overheat:
        cool = _overheat_hysteresis(h)
        over = [
            f"{name} {_deg(v)} is over the hard limit of {_deg(hard)}"
            for name, v, _, hard in sensors
            if v > hard
        ]
        head = "; ".join(over) + ": running work stops" if over else "cooling down from over the hard limit"
        return PolicyCondition(
            type_,
            "False",
            _R.OVERHEAT,
            f"{head}; it clears when battery is at or under {_deg(sensors[0][3] - cool)}"
            f" and compute at or under {_deg(sensors[1][3] - cool)}",
        )
    if car.thermal:
        over = [
            f"{name} {_deg(v)} is over the owner's soft limit of {_deg(soft)}"
            for name, v, soft, _ in sensors
            if v > soft
        ]
        head = "; ".join(over) if over else "cooling down from over the owner's soft limit"
        return PolicyCondition(
            type_,
            "False",
            _R.TEMPERATURE_HIGH,
            f"{head}; new work resumes when battery is at or under {_deg(sensors[0][2] - h.temperature_c)}"
            f" and compute at or under {_deg(sensors[1][2] - h.temperature_c)}",
        )
    return PolicyCondition(
        type_,
        "True",
        _R.TEMPERATURE_OK,
        f"battery {_deg(sensors[0][1])} and compute {_deg(sensors[1][1])} are within the owner's limits"
        f" of {_deg(sensors[0][2])} and {_deg(sensors[1][2])}",
    )


def _unknown(type_: str, in_force: Mapping[str, str | None], keys: Sequence[str]) -> PolicyCondition:
    kept = [key for key in keys if key in in_force]
    message = "no telemetry from the car yet"
    if kept:
        message += f"; keeping {' and '.join(kept)} from its last known state"
    return PolicyCondition(type_, "Unknown", _R.NO_TELEMETRY, message)


def _soc_band_label(soc: float, previous: str | None, margin: float) -> str:
    band = tk.soc_band(soc)
    last = int(previous) if previous is not None and previous.isdigit() and int(previous) <= 10 else None
    if last is None or band == last:
        return str(band)
    # Move only once soc is ``margin`` inside the new decile; until then report the decile next to it on the
    # side it came from. A full battery counts as inside "10", whose decile is a single point.
    if band > last:
        if soc < min(band / 10 + margin, 1.0) - _EPS:
            band -= 1
    elif soc > (band + 1) / 10 - margin + _EPS:
        band += 1
    return str(band)


def _schedulable_condition(
    reasons: Sequence[str], words: Mapping[str, str], unplugged: str | None
) -> PolicyCondition:
    type_ = _T.SCHEDULABLE
    if reasons:
        said: list[str] = []
        for reason in reasons:
            if words[reason] not in said:  # critical and low (overheat and thermal) share one message
                said.append(words[reason])
        return PolicyCondition(type_, "False", reasons[0], "no new work: " + "; ".join(said))
    if unplugged is not None:
        return PolicyCondition(
            type_,
            "True",
            _R.ON_BATTERY,
            "the car is unplugged and the owner allows work on battery: only jobs that allow unplugged cars"
            f" (tolerating {tk.UNPLUGGED}={tk.UNPLUGGED_ON_BATTERY}) can land",
        )
    return PolicyCondition(type_, "True", _R.READY, "ready for work: every owner's rule is met")


# --- time ---------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1024)
def _zone(name: str) -> tuple[tzinfo, bool]:
    """The owner's zone, and whether it is known; an unknown name reads as UTC (said in WithinSchedule)."""
    try:
        return ZoneInfo(name), True
    except (ZoneInfoNotFoundError, ValueError, OSError):
        return UTC, False


def _instant(zone: tzinfo, day: date, at: time) -> datetime:
    """The UTC instant of a local wall-clock time.

    In the fall-back repeated hour it is the first occurrence (fold=0). A wall time inside a spring-forward
    gap never happens; the boundary then falls at the first instant after the gap.
    """
    wall = datetime.combine(day, at)
    utc = wall.replace(tzinfo=zone).astimezone(UTC)
    if zone is UTC or utc.astimezone(zone).replace(tzinfo=None) == wall:
        return utc
    # In a gap fold=1 reads the wall time with the offset after the change, landing before the change, and
    # fold=0 lands after it; zoneinfo does not expose the transition itself, so bisect to the second.
    lo = int(wall.replace(tzinfo=zone, fold=1).timestamp())
    hi = int(utc.timestamp())
    after = utc.astimezone(zone).utcoffset()
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if datetime.fromtimestamp(mid, zone).utcoffset() == after:
            hi = mid
        else:
            lo = mid
    return datetime.fromtimestamp(hi, UTC)


@functools.lru_cache(maxsize=4096)
def _occurrences(
    zone: tzinfo, today: date, start: str, end: str, days: tuple[str, ...]
) -> tuple[tuple[datetime, datetime], ...]:
    """A window's (opens, closes) instants, in order, for the days from yesterday to a week ahead (local).

    Memoised: every car with the same window in the same zone asks for the same list all day long.
    """
    begin_at, end_at = time(int(start[:2]), int(start[3:5])), time(int(end[:2]), int(end[3:5]))
    # A window's days are the days it starts; one that ends before its start ends the next day.
    span = timedelta(days=1 if end_at < begin_at else 0)
    weekdays = {_WEEKDAYS[d] for d in days}
    out: list[tuple[datetime, datetime]] = []
    # A window lasts under a day, so only one that started yesterday or today can hold now, and the next start
    # is at most a week ahead.
    for ahead in range(-1, 8):
        day = today + timedelta(days=ahead)
        if day.weekday() in weekdays:
            opens, closes = _instant(zone, day, begin_at), _instant(zone, day + span, end_at)
            if opens < closes:  # a window inside a spring-forward gap never opens that day
                out.append((opens, closes))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class _Schedule:
    inside: bool
    closes_at: datetime | None  # when the window now is in ends (the latest, when windows overlap)
    opens_at: datetime | None  # the next window start after now
    next_boundary: datetime | None  # the earliest start or end after now


def _schedule(windows: Sequence[AvailabilityWindow], zone: tzinfo, now: datetime, today: date) -> _Schedule:
    if not windows:
        return _Schedule(True, None, None, None)
    closes_at: datetime | None = None
    first_close: datetime | None = None
    opens_at: datetime | None = None
    for window in windows:
        for opens, closes in _occurrences(zone, today, window.start, window.end, tuple(window.days)):
            if opens > now:
                opens_at = _earliest(opens_at, opens)
                break
            if now < closes:
                closes_at = closes if closes_at is None else max(closes_at, closes)
                first_close = _earliest(first_close, closes)
    return _Schedule(closes_at is not None, closes_at, opens_at, _earliest(first_close, opens_at))


def _schedule_condition(
    policy: Policy, schedule: _Schedule, zone: tzinfo, zone_name: str, zone_known: bool, now: datetime
) -> PolicyCondition:
    type_ = _T.WITHIN_SCHEDULE
    unknown = (
        ""
        if zone_known
        else f"; the time zone {policy.timezone!r} is unknown, so times are read as UTC"
        " (fix spec.policy.timezone)"
    )
    if not policy.availability:
        return PolicyCondition(type_, "True", _R.IN_WINDOW, "no availability windows: any time" + unknown)
    if schedule.closes_at is not None:  # inside a window
        return PolicyCondition(
            type_,
            "True",
            _R.IN_WINDOW,
            f"inside the owner's availability window ({zone_name});"
            f" it closes {_local(schedule.closes_at, zone)}" + unknown,
        )
    opens = (
        f"the next window opens {_local(schedule.opens_at, zone)}"
        if schedule.opens_at is not None
        else "no window opens in the coming week"
    )
    return PolicyCondition(
        type_,
        "False",
        _R.OUT_OF_WINDOW,
        f"outside the owner's availability windows ({zone_name}, local time {_local(now, zone)}); {opens}"
        + unknown,
    )


def _earliest(a: datetime | None, b: datetime | None) -> datetime | None:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)


# --- words --------------------------------------------------------------------------------------------------


def _local(instant: datetime, zone: tzinfo) -> str:
    return instant.astimezone(zone).strftime("%a %Y-%m-%d %H:%M %Z")


def _num(value: float, digits: int = 1) -> str:
    text = f"{value:.{digits}f}".rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def _pct(fraction: float) -> str:
    return f"{_num(fraction * 100)} %"


def _deg(celsius: float) -> str:
    return f"{_num(celsius)} °C"


def _kwh(kwh: float) -> str:
    return f"{_num(kwh, 2)} kWh"
