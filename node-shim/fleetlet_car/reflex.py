"""The safety reflex: the car agent's own, synchronous enforcement of the owner's hard limits.

``SafetyReflex`` is fed every vehicle-state change by the vehicle interface (it is an observer, never a poll).
The instant the car is no longer Parked (Preparing, Driving or Unknown), its state of charge falls under the
stop floor (``max(hardMinStateOfCharge, minStateOfCharge - criticalMargin)``), the pack or the computer is over
its hard temperature limit, or (when the owner requires it) the car is unplugged, it calls every registered
stop callback (e.g. a sandbox's kill function) before ``observe`` returns, and records what tripped it, when the
change was seen and when the callbacks had all returned (``time.perf_counter_ns``).

After a trip it refuses new work (``admit``) until the car is safe again, with hysteresis: parked, the charge
back at ``max(minStateOfCharge, stop floor + soc_hysteresis)`` and temperatures back under
``min(soft limit, hard limit - temperature_hysteresis_c)``. Each trigger stays latched until its own resume
level is reached, so the callbacks run once per new trigger, not at every wobble of a reading around a limit;
a different trigger (the owner drives off while work is held for low charge) fires them again.

This module must never wait: no asyncio, no network, no sleep, no lock held while a callback runs, and no
logging before the stop callbacks have returned. Stop callbacks must be idempotent and quick (send a signal,
flip a flag); they may be called more than once for one piece of work.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from fleetlet.api.v1alpha1.vehiclenode import Policy

from .vehicle import VehicleInterface, VehicleState

logger = logging.getLogger(__name__)

StopCallback = Callable[[], None]


class StopTrigger(StrEnum):
    """Why the reflex stopped work (CamelCase, usable as a condition reason)."""

    NOT_PARKED = "NotParked"
    CHARGE_BELOW_STOP_FLOOR = "ChargeBelowStopFloor"
    BATTERY_OVERHEAT = "BatteryTemperatureAboveHardLimit"
    COMPUTE_OVERHEAT = "ComputeTemperatureAboveHardLimit"
    UNPLUGGED = "UnpluggedWhileRequired"


class Refusal(StrEnum):
    """Why ``admit`` refuses new work."""

    NO_VEHICLE_STATE = "NoVehicleState"
    NOT_PARKED = "NotParked"
    CHARGE_LOW = "ChargeBelowResumeLevel"
    BATTERY_WARM = "BatteryTemperatureAboveResumeLevel"
    COMPUTE_WARM = "ComputeTemperatureAboveResumeLevel"
    UNPLUGGED = "Unplugged"


_RESOLVES: dict[Refusal, StopTrigger] = {
    Refusal.NOT_PARKED: StopTrigger.NOT_PARKED,
    Refusal.CHARGE_LOW: StopTrigger.CHARGE_BELOW_STOP_FLOOR,
    Refusal.BATTERY_WARM: StopTrigger.BATTERY_OVERHEAT,
    Refusal.COMPUTE_WARM: StopTrigger.COMPUTE_OVERHEAT,
    Refusal.UNPLUGGED: StopTrigger.UNPLUGGED,
}
_REFUSAL_OF: dict[StopTrigger, Refusal] = {t: r for r, t in _RESOLVES.items()}


@dataclass(frozen=True, slots=True)
class ReflexLimits:
    """The thresholds the reflex enforces, derived from the owner's ``Policy``."""

    stop_soc: float
    resume_soc: float
    hard_max_battery_c: float
    resume_battery_c: float
    hard_max_compute_c: float
    resume_compute_c: float
    require_plugged_in: bool

    @classmethod
    def from_policy(
        cls, policy: Policy, *, soc_hysteresis: float = 0.02, temperature_hysteresis_c: float = 3.0
    ) -> ReflexLimits:
        stop_soc = max(policy.hard_min_state_of_charge, policy.min_state_of_charge - policy.critical_margin)
        return cls(
            stop_soc=stop_soc,
            resume_soc=min(1.0, max(policy.min_state_of_charge, stop_soc + soc_hysteresis)),
            hard_max_battery_c=policy.hard_max_battery_temperature_c,
            resume_battery_c=min(
                policy.max_battery_temperature_c,
                policy.hard_max_battery_temperature_c - temperature_hysteresis_c,
            ),
            hard_max_compute_c=policy.hard_max_compute_temperature_c,
            resume_compute_c=min(
                policy.max_compute_temperature_c,
                policy.hard_max_compute_temperature_c - temperature_hysteresis_c,
            ),
            require_plugged_in=policy.require_plugged_in,
        )

    def stop_triggers(self, s: VehicleState) -> frozenset[StopTrigger]:
        out: set[StopTrigger] = set()
        if s.drive_state != "Parked":
            out.add(StopTrigger.NOT_PARKED)
        if s.state_of_charge < self.stop_soc:
            out.add(StopTrigger.CHARGE_BELOW_STOP_FLOOR)
        if s.battery_temperature_c > self.hard_max_battery_c:
            out.add(StopTrigger.BATTERY_OVERHEAT)
        if s.compute_temperature_c > self.hard_max_compute_c:
            out.add(StopTrigger.COMPUTE_OVERHEAT)
        if self.require_plugged_in and not s.plugged_in:
            out.add(StopTrigger.UNPLUGGED)
        return frozenset(out)

    def refusals(self, s: VehicleState) -> tuple[Refusal, ...]:
        out: list[Refusal] = []
        if s.drive_state != "Parked":
            out.append(Refusal.NOT_PARKED)
        if s.state_of_charge < self.resume_soc:
            out.append(Refusal.CHARGE_LOW)
        if s.battery_temperature_c > self.resume_battery_c:
            out.append(Refusal.BATTERY_WARM)
        if s.compute_temperature_c > self.resume_compute_c:
            out.append(Refusal.COMPUTE_WARM)
        if self.require_plugged_in and not s.plugged_in:
            out.append(Refusal.UNPLUGGED)
        return tuple(out)


@dataclass(frozen=True, slots=True)
class Trip:
    """One firing of the reflex."""

    triggers: frozenset[StopTrigger]
    state: VehicleState
    changed_at_ns: int  # when the vehicle interface saw the change
    stopped_at_ns: int  # when every stop callback had returned
    callbacks: int
    failures: int

    @property
    def latency_ns(self) -> int:
        return self.stopped_at_ns - self.changed_at_ns


@dataclass(frozen=True, slots=True)
class Admission:
    allowed: bool
    reasons: tuple[str, ...] = ()


class SafetyReflex:
    """See the module docstring. Thread-safe: ``observe`` may run on the vehicle bus thread."""

    def __init__(
        self,
        policy: Policy,
        *,
        soc_hysteresis: float = 0.02,
        temperature_hysteresis_c: float = 3.0,
        history: int = 256,
    ) -> None:
        self._soc_hysteresis = soc_hysteresis
        self._temperature_hysteresis_c = temperature_hysteresis_c
        self.policy = policy  # the owner's rules the limits come from (the agent starts from them too)
        self.limits = ReflexLimits.from_policy(
            policy, soc_hysteresis=soc_hysteresis, temperature_hysteresis_c=temperature_hysteresis_c
        )
        self._lock = threading.Lock()
        self._callbacks: list[StopCallback] = []
        self._state: VehicleState | None = None
        self._latched: frozenset[StopTrigger] = frozenset()
        self._trips: deque[Trip] = deque(maxlen=history)

    # ---- wiring ---------------------------------------------------------------------------------------------

    def attach(self, vehicle: VehicleInterface) -> Callable[[], None]:
        """Subscribe to ``vehicle`` ahead of other observers and judge its current state; returns unsubscribe."""
        unsubscribe = vehicle.subscribe(self.observe, first=True)
        self.observe(vehicle.state())
        return unsubscribe

    def add_stop_callback(self, callback: StopCallback) -> Callable[[], None]:
        """Register ``callback`` (e.g. a sandbox's kill); returns a function that removes it.

        Register before starting the work and call ``admit`` after: if the reflex is already tripped the
        callback is called at once, so work can never start unguarded.
        """
        with self._lock:
            self._callbacks.append(callback)
            tripped = bool(self._latched)
        if tripped:
            error = self._call(callback)
            if error is not None:
                logger.error("safety reflex: a stop callback failed", exc_info=error)

        def remove() -> None:
            with self._lock:
                if callback in self._callbacks:
                    self._callbacks.remove(callback)

        return remove

    def set_policy(self, policy: Policy) -> None:
        """Adopt the owner's new policy and judge the last state against it at once."""
        limits = ReflexLimits.from_policy(
            policy,
            soc_hysteresis=self._soc_hysteresis,
            temperature_hysteresis_c=self._temperature_hysteresis_c,
        )
        with self._lock:
            self.limits = limits
            self.policy = policy
            state = self._state
        if state is not None:
            self.observe(state)

    # ---- the hot path ---------------------------------------------------------------------------------------

    def observe(self, state: VehicleState) -> None:
        """Judge one vehicle state; on a new stop trigger, run every stop callback before returning."""
        changed_at_ns = state.changed_at_ns or time.perf_counter_ns()
        triggers = self.limits.stop_triggers(state)
        callbacks: tuple[StopCallback, ...] = ()
        with self._lock:
            self._state = state
            # A trigger stays latched until its own resume level is reached (hysteresis), so a reading that
            # wobbles around a limit stops work once, not at every wobble.
            unresolved = {_RESOLVES[r] for r in self.limits.refusals(state)}
            before = self._latched
            self._latched = frozenset((before & unresolved) | triggers)
            fresh = triggers - before
            if fresh:
                callbacks = tuple(self._callbacks)
        if not fresh:
            if before and not self._latched:
                logger.info("safety reflex: car safe again, accepting work")
            return
        errors: list[Exception] = []
        for cb in callbacks:
            error = self._call(cb)
            if error is not None:
                errors.append(error)
        stopped_at_ns = time.perf_counter_ns()
        failures = len(errors)
        trip = Trip(triggers, state, changed_at_ns, stopped_at_ns, len(callbacks), failures)
        with self._lock:
            self._trips.append(trip)
        for error in errors:
            logger.error("safety reflex: a stop callback failed", exc_info=error)
        logger.warning(
            "safety reflex tripped: %s; %d stop callbacks in %.3f ms (%d failed)",
            ",".join(sorted(fresh)), len(callbacks), trip.latency_ns / 1e6, failures,
        )  # fmt: skip

    @staticmethod
    def _call(callback: StopCallback) -> Exception | None:
        try:
            callback()
        except Exception as error:  # every callback must run even if one fails; logged once all have run
            return error
        return None

    # ---- what the agent asks --------------------------------------------------------------------------------

    def admit(self) -> Admission:
        """May new work start now? No until a state was seen, while tripped, or while not safe to resume."""
        with self._lock:
            state, latched, limits = self._state, self._latched, self.limits
        if state is None:
            return Admission(False, (Refusal.NO_VEHICLE_STATE,))
        reasons: list[str] = list(limits.refusals(state))
        # Latched triggers clear exactly when their refusals do; listed too should the two ever diverge.
        reasons.extend(t for t in sorted(latched) if _REFUSAL_OF[t] not in reasons)
        return Admission(not reasons, tuple(reasons))

    @property
    def tripped(self) -> bool:
        """True from a stop until every trigger that caused it is back at its resume level."""
        return bool(self._latched)

    @property
    def latched_triggers(self) -> frozenset[StopTrigger]:
        return self._latched

    @property
    def last_trip(self) -> Trip | None:
        with self._lock:
            return self._trips[-1] if self._trips else None

    @property
    def trips(self) -> list[Trip]:
        with self._lock:
            return list(self._trips)
