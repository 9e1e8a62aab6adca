"""A SIMULATED fleet: N simulated cars stepped together on a simulated clock, vectorised with numpy.

``SimulatedFleet`` holds every car's state in arrays (one element per car) and advances them with
``step(dt_s)``: battery and thermal physics (``physics``), seeded driving and plug-in schedules (``schedule``)
and cellular links (``connectivity``). It reports each car's telemetry as a ``Telemetry``-shaped dict (camelCase
keys) and returns the drive-state changes each step produced. ``SimulatedCar`` is a handle on one row of a fleet
(a fleet of one for a lone simulated agent), so one car and 100,000 cars run the same code.

``make_vehicle_specs`` produces seeded ``VehicleNodeSpec``s (pseudonymous ids such as ``car-000123``, owners,
regions, hardware mixes) for the fleet to simulate.

This module must never talk to a cluster, a network or a real car, and never reads the wall clock for
simulated time; the wall clock (``time.perf_counter_ns``) is read only to stamp when an observer was told of a
change, so the safety reflex can measure its own latency. It never enforces an owner's rule itself: work left
running on a car that drives is metered (``work_while_not_parked_s``) so tests and benchmarks can see a breach.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import numpy.typing as npt

from fleetlet.api.v1alpha1.vehiclenode import (
    Accelerator,
    AvailabilityWindow,
    DriveState,
    Hardware,
    Owner,
    Policy,
    VehicleNodeSpec,
)

from . import physics as ph
from .connectivity import ConnectivityConfig, ConnectivityModel
from .schedule import DaySchedule, DriverHabits, DrivingSchedule

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.int64]

DRIVE_STATES: tuple[DriveState, ...] = ("Parked", "Preparing", "Driving", "Unknown")
PARKED, PREPARING, DRIVING, UNKNOWN = range(4)
_CODE: dict[str, int] = {s: i for i, s in enumerate(DRIVE_STATES)}

# Schedule event kinds, in the order they happen within a leg.
_PREPARE, _DEPART, _ARRIVE, _PLUG = range(4)

DEFAULT_START = datetime(2025, 6, 2, tzinfo=UTC)  # a Monday
DEFAULT_MANUAL_SPEED_KMH = 50.0

# Hardware mixes: accelerator type -> (share, accelerators, TOPS each, compute W, awake W, cpu, memory, packs kWh).
HARDWARE_MIX: dict[str, tuple[float, int, float, float, float, str, str, tuple[float, ...]]] = {
    "hw3": (0.20, 2, 36.0, 72.0, 180.0, "4", "6Gi", (60.0, 75.0)),
    "hw4": (0.35, 2, 50.0, 160.0, 200.0, "8", "12Gi", (75.0, 82.0, 100.0)),
    "orin": (0.30, 1, 254.0, 130.0, 150.0, "8", "16Gi", (64.0, 77.0, 90.0)),
    "orin-dual": (0.15, 2, 254.0, 250.0, 220.0, "12", "32Gi", (90.0, 100.0)),
}


@dataclass(frozen=True, slots=True)
class DriveStateChange:
    """A simulated car's drive state changed at ``at_s`` on the fleet clock."""

    index: int
    vehicle_id: str
    at_s: float
    previous: DriveState
    current: DriveState


@dataclass(frozen=True, slots=True)
class CarTraits:
    """Simulation-only properties of each car (arrays, one element per car) that the spec does not say."""

    utc_offset_h: FloatArray
    climate_mean_c: FloatArray
    climate_amplitude_c: FloatArray
    climate_peak_hour: FloatArray
    sun_exposure: FloatArray  # 0 in a garage, 1 in full sun
    charge_limit: FloatArray  # the owner's charge limit in the car's settings
    charge_efficiency: FloatArray
    standby_power_w: FloatArray
    consumption_factor: FloatArray  # bigger, heavier cars use more per km
    initial_soc: FloatArray
    initial_plugged_in: BoolArray

    @classmethod
    def draw(cls, rng: np.random.Generator, regions: Sequence[str]) -> CarTraits:
        n = len(regions)
        known = [ph.REGIONS.get(r, ph.REGIONS["eu-central"]) for r in regions]
        return cls(
            utc_offset_h=np.array([k[1] for k in known], dtype=np.float64),
            climate_mean_c=np.array([k[2].mean_c for k in known]) + rng.normal(0.0, 2.0, n),
            climate_amplitude_c=np.array([k[2].amplitude_c for k in known]) * rng.uniform(0.8, 1.2, n),
            climate_peak_hour=np.array([k[2].peak_hour for k in known], dtype=np.float64),
            sun_exposure=np.where(rng.random(n) < 0.4, 0.0, rng.uniform(0.2, 1.0, n)),
            charge_limit=rng.choice(np.array([0.8, 0.9, 1.0]), size=n, p=[0.5, 0.4, 0.1]),
            charge_efficiency=rng.uniform(0.86, 0.92, n),
            standby_power_w=rng.uniform(8.0, 25.0, n),
            consumption_factor=rng.uniform(0.9, 1.15, n),
            initial_soc=rng.uniform(0.4, 0.9, n),
            initial_plugged_in=rng.random(n) < 0.6,
        )

    def with_values(self, **values: float | bool) -> CarTraits:
        """The same traits with some set to one value for every car (tests, scenarios)."""
        n = len(self.utc_offset_h)
        return replace(self, **{k: np.full(n, v, dtype=getattr(self, k).dtype) for k, v in values.items()})


def make_vehicle_specs(
    n: int, seed: int, *, regions: Sequence[str] | None = None, first_index: int = 0
) -> list[VehicleNodeSpec]:
    """``n`` seeded VehicleNode specs: ids ``car-000123``, pseudonymous owners, regions, hardware mixes."""
    rng = np.random.default_rng([int(seed), 0x5BEC])
    region_names = list(regions or ph.REGIONS)
    region = rng.choice(len(region_names), size=n)
    kinds = list(HARDWARE_MIX)
    kind = rng.choice(len(kinds), size=n, p=[HARDWARE_MIX[k][0] for k in kinds])
    pack_pick = rng.random(n)
    # About one car in ten belongs to an owner who already has one (households, small fleets).
    owner_no = np.cumsum(rng.random(n) >= 0.1) + first_index
    min_soc = rng.choice(np.array([0.4, 0.5, 0.6]), size=n, p=[0.3, 0.5, 0.2])
    plugged_only = rng.random(n) < 0.85
    overnight_only = rng.random(n) < 0.6
    cap_kwh = rng.choice(np.array([3.0, 5.0, 8.0]), size=n, p=[0.3, 0.5, 0.2])
    payout = rng.choice(np.array([0.6, 0.7, 0.8]), size=n)
    specs: list[VehicleNodeSpec] = []
    for i in range(n):
        name = kinds[kind[i]]
        _, count, tops, compute_w, idle_w, cpu, memory, packs = HARDWARE_MIX[name]
        zone = ph.REGIONS.get(region_names[region[i]], ("UTC", 0.0, ph.Climate()))[0]
        specs.append(
            VehicleNodeSpec(
                vehicle_id=f"car-{first_index + i:06d}",
                owner=Owner(id=f"owner-{int(owner_no[i]):06d}", payout_share=float(payout[i])),
                region=region_names[region[i]],
                hardware=Hardware(
                    cpu=cpu,
                    memory=memory,
                    accelerators=[Accelerator(type=name, count=count, tops=tops)],
                    battery_capacity_kwh=packs[int(pack_pick[i] * len(packs))],
                    compute_power_w=compute_w,
                    idle_power_w=idle_w,
                ),
                policy=Policy(
                    min_state_of_charge=float(min_soc[i]),
                    require_plugged_in=bool(plugged_only[i]),
                    availability=[AvailabilityWindow(start="22:00", end="06:00")]
                    if overnight_only[i]
                    else [],
                    timezone=zone,
                    max_energy_per_day_kwh=float(cap_kwh[i]),
                ),
            )
        )
    return specs


class SimulatedFleet:
    """N simulated cars on one simulated clock; see the module docstring."""

    def __init__(
        self,
        specs: Sequence[VehicleNodeSpec],
        *,
        seed: int,
        start: datetime = DEFAULT_START,
        schedules: bool = True,
        connectivity: ConnectivityConfig | None = None,
        traits: CarTraits | None = None,
    ) -> None:
        if not specs:
            raise ValueError("a simulated fleet needs at least one car spec")
        if start.tzinfo is None:
            raise ValueError("start must be timezone-aware (UTC)")
        n = len(specs)
        self.n = n
        self.specs = list(specs)
        self.start = start
        self.vehicle_ids = [s.vehicle_id for s in specs]
        self._index = {v: i for i, v in enumerate(self.vehicle_ids)}
        if len(self._index) != n:
            raise ValueError("vehicle ids must be unique")
        ss = np.random.SeedSequence([int(seed), 0xF1EE7])
        trait_ss, habit_ss, link_ss, sched_ss = ss.spawn(4)
        self.traits = traits or CarTraits.draw(np.random.default_rng(trait_ss), [s.region for s in specs])
        if len(self.traits.utc_offset_h) != n:
            raise ValueError("traits must have one element per car")
        self.habits = DriverHabits.draw(np.random.default_rng(habit_ss), self.traits.utc_offset_h)
        self.schedule = DrivingSchedule(
            self.habits, int(sched_ss.generate_state(1)[0]), start_weekday=start.weekday()
        )
        self.links = ConnectivityModel(n, np.random.default_rng(link_ss), connectivity)
        self._schedules = schedules

        hw = [s.hardware for s in specs]
        self.capacity_kwh = np.array([h.battery_capacity_kwh for h in hw], dtype=np.float64)
        self.compute_power_w = np.array([h.compute_power_w for h in hw], dtype=np.float64)
        self.idle_power_w = np.array([h.idle_power_w for h in hw], dtype=np.float64)

        t = self.traits
        self.now_s = 0.0
        self.state_of_charge = t.initial_soc.astype(np.float64).copy()
        self.plugged_in = t.initial_plugged_in.copy() & (self.habits.home_charger_w > 0.0)
        self.charger_w = self.habits.home_charger_w.copy()
        self.at_home = np.ones(n, dtype=bool)
        self.charging = self.plugged_in & (self.state_of_charge < t.charge_limit)
        self.drive_state = np.zeros(n, dtype=np.int8)
        self.speed_kmh = np.zeros(n)
        self.work_load = np.zeros(n)  # 0..1 of compute power, set by whoever runs work on the car
        amb = self.ambient_c()
        self.battery_temperature_c = amb.copy()
        self.compute_temperature_c = amb.copy()
        self.link_quality = self.links.quality(0.0, np.zeros(n, dtype=bool))
        # Meters (kWh, km, s), cumulative since the start.
        self.work_energy_kwh = np.zeros(n)
        self.battery_discharged_kwh = np.zeros(n)
        self.battery_charged_kwh = np.zeros(n)
        self.grid_energy_kwh = np.zeros(n)
        self.drive_energy_kwh = np.zeros(n)
        self.odometer_km = np.zeros(n)
        self.work_while_not_parked_s = np.zeros(n)

        self._watchers: dict[int, list[Callable[[int, int], None]]] = {}
        self._next_day = -1
        self._ev: dict[str, np.ndarray] = {
            "t": np.zeros(0), "car": np.zeros(0, np.int64), "kind": np.zeros(0, np.int8),
            "speed": np.zeros(0), "plug": np.zeros(0, bool), "charger": np.zeros(0), "home": np.zeros(0, bool),
        }  # fmt: skip
        self._ev_pos = 0
        if schedules:
            self._ensure_days(0.0)

    # ---- construction helpers -------------------------------------------------------------------------------

    @classmethod
    def generate(cls, n: int, *, seed: int, **kwargs: Any) -> SimulatedFleet:
        """A fleet of ``n`` cars from ``make_vehicle_specs(n, seed)``."""
        return cls(make_vehicle_specs(n, seed), seed=seed, **kwargs)

    def index_of(self, vehicle_id: str) -> int:
        return self._index[vehicle_id]

    def car(self, index: int) -> SimulatedCar:
        return SimulatedCar(self, index)

    @property
    def now(self) -> datetime:
        return self.start + timedelta(seconds=self.now_s)

    # ---- physics --------------------------------------------------------------------------------------------

    def local_hour(self, at_s: float | None = None) -> FloatArray:
        t = self.now_s if at_s is None else at_s
        return np.mod(t / ph.S_PER_H + self.traits.utc_offset_h, 24.0)

    def ambient_c(self, at_s: float | None = None) -> FloatArray:
        t = self.traits
        return ph.ambient_c(
            t.climate_mean_c, t.climate_amplitude_c, t.climate_peak_hour, self.local_hour(at_s)
        )

    def step(self, dt_s: float) -> list[DriveStateChange]:
        """Advance every car by ``dt_s`` seconds; return the drive-state changes, in time order.

        Physics runs over the step with the states at its start; schedule events due in the step are applied at
        its end (keep ``dt_s`` well under a trip's length: 1-60 s). Watchers are told after the step.
        """
        if dt_s <= 0.0:
            raise ValueError("dt_s must be positive")
        t0, t1 = self.now_s, self.now_s + dt_s
        if self._schedules:
            self._ensure_days(t1)
        tr = self.traits
        mid_s = t0 + dt_s / 2.0
        local_h = self.local_hour(mid_s)
        amb = ph.ambient_c(tr.climate_mean_c, tr.climate_amplitude_c, tr.climate_peak_hour, local_h)
        ds = self.drive_state
        driving = ds == DRIVING
        preparing = ds == PREPARING
        parked = ds == PARKED
        working = self.work_load > 0.0

        work_w = self.work_load * self.compute_power_w + np.where(working, self.idle_power_w, 0.0)
        consumption = ph.drive_consumption_kwh_per_km(self.speed_kmh, amb, tr.consumption_factor)
        traction_w = np.where(driving, consumption * self.speed_kmh * 1000.0, 0.0)
        load_w = (
            work_w
            + traction_w
            + np.where(driving, ph.DRIVE_AUX_POWER_W, 0.0)
            + np.where(preparing, ph.PRECONDITION_POWER_W, 0.0)
            + np.where(parked & ~working, tr.standby_power_w, 0.0)
        )
        plugged = self.plugged_in & ~driving
        b = ph.battery_step(
            self.state_of_charge, self.capacity_kwh, load_w, plugged, self.charger_w, tr.charge_limit,
            tr.charge_efficiency, dt_s,
        )  # fmt: skip
        battery_kwh = ph.energy_kwh(b.battery_w, dt_s)
        self.battery_charged_kwh += np.maximum(battery_kwh, 0.0)
        self.battery_discharged_kwh += np.maximum(-battery_kwh, 0.0)
        self.grid_energy_kwh += ph.energy_kwh(b.charger_ac_w, dt_s)
        self.work_energy_kwh += ph.energy_kwh(work_w, dt_s)
        self.drive_energy_kwh += ph.energy_kwh(traction_w, dt_s)
        self.odometer_km += self.speed_kmh * np.where(driving, dt_s / ph.S_PER_H, 0.0)
        self.work_while_not_parked_s += np.where(working & ~parked, dt_s, 0.0)

        compute_heat_w = self.work_load * self.compute_power_w + np.where(
            driving, ph.DRIVING_COMPUTE_LOAD * self.compute_power_w, 0.0
        )
        cabin_c = np.where(driving, amb, amb + ph.sun_gain_c(tr.sun_exposure, local_h))
        self.compute_temperature_c = ph.relax(
            self.compute_temperature_c,
            ph.compute_target_c(cabin_c, compute_heat_w, driving),
            dt_s,
            ph.COMPUTE_TAU_S,
        )
        pack_heat_w = (
            b.charger_ac_w * (1.0 - tr.charge_efficiency) * ph.CHARGE_LOSS_TO_PACK
            + traction_w * ph.TRACTION_LOSS_TO_PACK
        )
        self.battery_temperature_c = ph.relax(
            self.battery_temperature_c, ph.battery_target_c(amb, pack_heat_w, self.capacity_kwh), dt_s,
            ph.BATTERY_TAU_S,
        )  # fmt: skip
        self.state_of_charge = b.state_of_charge
        self.now_s = t1
        changes = self._apply_due_events(t1) if self._schedules else []
        self.charging = self.plugged_in & (self.state_of_charge < tr.charge_limit) & (self.charger_w > 0.0)
        self.links.step(t1)
        self.link_quality = self.links.quality(t1, self.drive_state == DRIVING)
        self._notify(self._watchers.keys())
        return changes

    # ---- schedule events ------------------------------------------------------------------------------------

    def _ensure_days(self, until_s: float) -> None:
        # Local day d starts no earlier than fleet hour 24d - 12 (UTC offsets stay within +/-12 h).
        while (self._next_day * 24.0 - 12.0) * ph.S_PER_H <= until_s:
            self._add_day(self.schedule.day(self._next_day))
            self._next_day += 1

    def _add_day(self, day: DaySchedule) -> None:
        legs = day.legs
        if len(legs):
            # A car whose day had begun before the clock started keeps that day at home, whole trips only.
            late = np.unique(legs.car[legs.prepare_s < self.now_s])
            if late.size:
                legs = legs.take(~np.isin(legs.car, late))
        m = len(legs)
        speed = legs.speed_kmh
        home_w = self.habits.home_charger_w
        new = {
            "t": np.concatenate([legs.prepare_s, legs.depart_s, legs.arrive_s, day.plug_at_s]),
            "car": np.concatenate([legs.car, legs.car, legs.car, day.plug_car]),
            "kind": np.concatenate(
                [
                    np.full(m, _PREPARE),
                    np.full(m, _DEPART),
                    np.full(m, _ARRIVE),
                    np.full(day.plug_car.size, _PLUG),
                ]
            ).astype(np.int8),
            "speed": np.concatenate([np.zeros(m), speed, np.zeros(m), np.zeros(day.plug_car.size)]),
            "plug": np.concatenate(
                [np.zeros(2 * m, bool), legs.plug_on_arrival, np.ones(day.plug_car.size, bool)]
            ),
            "charger": np.concatenate([np.zeros(2 * m), legs.charger_w, home_w[day.plug_car]]),
            "home": np.concatenate([np.zeros(2 * m, bool), legs.to_home, np.ones(day.plug_car.size, bool)]),
        }
        keep = new["t"] >= self.now_s
        merged = {k: np.concatenate([v[self._ev_pos :], new[k][keep]]) for k, v in self._ev.items()}
        order = np.argsort(merged["t"], kind="stable")
        self._ev = {k: v[order] for k, v in merged.items()}
        self._ev_pos = 0

    def _apply_due_events(self, until_s: float) -> list[DriveStateChange]:
        ev = self._ev
        end = int(np.searchsorted(ev["t"], until_s, side="right"))
        start = self._ev_pos
        if end <= start:
            return []
        self._ev_pos = end
        sl = slice(start, end)
        cars, kinds = ev["car"][sl], ev["kind"][sl]
        count = end - start
        # A car with several events in one step gets them applied in order, one round per occurrence.
        order = np.argsort(cars, kind="stable")
        sorted_cars = cars[order]
        first = np.ones(count, dtype=bool)
        first[1:] = sorted_cars[1:] != sorted_cars[:-1]
        group_start = np.maximum.accumulate(np.where(first, np.arange(count), 0))
        rank = np.empty(count, dtype=np.int64)
        rank[order] = np.arange(count) - group_start
        previous = np.empty(count, dtype=np.int8)
        current = np.empty(count, dtype=np.int8)
        for r in range(int(rank.max()) + 1):
            sel = np.flatnonzero(rank == r)
            c, k = cars[sel], kinds[sel]
            prev = self.drive_state[c].copy()
            nxt = prev.copy()
            nxt[k == _PREPARE] = PREPARING
            dep = k == _DEPART
            nxt[dep] = DRIVING
            self.speed_kmh[c[dep]] = ev["speed"][sl][sel[dep]]
            self.plugged_in[c[dep]] = False
            arr = k == _ARRIVE
            ca = c[arr]
            nxt[arr] = PARKED
            self.speed_kmh[ca] = 0.0
            self.plugged_in[ca] = ev["plug"][sl][sel[arr]]
            self.charger_w[ca] = ev["charger"][sl][sel[arr]]
            self.at_home[ca] = ev["home"][sl][sel[arr]]
            plug = (k == _PLUG) & (prev == PARKED) & self.at_home[c] & ~self.plugged_in[c]
            cp = c[plug]
            self.plugged_in[cp] = True
            self.charger_w[cp] = ev["charger"][sl][sel[plug]]
            self.drive_state[c] = nxt
            previous[sel], current[sel] = prev, nxt
        changed = np.flatnonzero(previous != current)
        ids = self.vehicle_ids
        return [
            DriveStateChange(i, ids[i], t, DRIVE_STATES[p], DRIVE_STATES[q])
            for i, t, p, q in zip(
                cars[changed].tolist(), ev["t"][sl][changed].tolist(), previous[changed].tolist(),
                current[changed].tolist(), strict=True,
            )
        ]  # fmt: skip

    # ---- control (scenarios, tests, whoever runs work on the cars) ------------------------------------------

    def set_work(self, index: int | Sequence[int] | npt.NDArray[np.integer], load: float) -> None:
        """Run work at ``load`` (0..1 of the car's compute power) on the given cars; 0 stops it."""
        if not 0.0 <= load <= 1.0:
            raise ValueError("load must be within 0..1")
        self.work_load[np.asarray(index, dtype=np.int64)] = load

    def set_drive_state(
        self, index: int, state: DriveState, *, speed_kmh: float = DEFAULT_MANUAL_SPEED_KMH
    ) -> None:
        """Force car ``index`` into ``state`` now and tell its watchers before returning."""
        changed_at_ns = time.perf_counter_ns()
        code = _CODE[state]
        self.drive_state[index] = code
        self.speed_kmh[index] = speed_kmh if code == DRIVING else 0.0
        if code == DRIVING:
            self.plugged_in[index] = False
            self.charging[index] = False
        self._notify((index,), changed_at_ns)

    def set_plugged_in(self, index: int, plugged_in: bool, *, charger_w: float | None = None) -> None:
        changed_at_ns = time.perf_counter_ns()
        self.plugged_in[index] = plugged_in
        if charger_w is not None:
            self.charger_w[index] = charger_w
        self.charging[index] = (
            plugged_in
            and self.state_of_charge[index] < self.traits.charge_limit[index]
            and self.charger_w[index] > 0
        )
        self._notify((index,), changed_at_ns)

    def set_state_of_charge(self, index: int, state_of_charge: float) -> None:
        changed_at_ns = time.perf_counter_ns()
        self.state_of_charge[index] = min(max(state_of_charge, 0.0), 1.0)
        self._notify((index,), changed_at_ns)

    def set_temperatures(
        self, index: int, *, battery_c: float | None = None, compute_c: float | None = None
    ) -> None:
        changed_at_ns = time.perf_counter_ns()
        if battery_c is not None:
            self.battery_temperature_c[index] = battery_c
        if compute_c is not None:
            self.compute_temperature_c[index] = compute_c
        self._notify((index,), changed_at_ns)

    # ---- observers and telemetry ----------------------------------------------------------------------------

    def watch(self, index: int, callback: Callable[[int, int], None]) -> Callable[[], None]:
        """Call ``callback(index, changed_at_ns)`` synchronously on every change to car ``index``.

        Returns a function that removes the callback. Cheap per watched car; unwatched cars cost nothing.
        """
        self._watchers.setdefault(index, []).append(callback)

        def unwatch() -> None:
            callbacks = self._watchers.get(index, [])
            if callback in callbacks:
                callbacks.remove(callback)
            if not callbacks:
                self._watchers.pop(index, None)

        return unwatch

    def _notify(self, indices: Iterable[int], changed_at_ns: int | None = None) -> None:
        stamp = time.perf_counter_ns() if changed_at_ns is None else changed_at_ns
        for i in list(indices):
            for cb in tuple(self._watchers.get(i, ())):
                try:
                    cb(i, stamp)
                except Exception:  # one broken observer must not starve the others
                    logger.exception("simulated car watcher failed for %s", self.vehicle_ids[i])

    def connected(self, index: int) -> bool:
        return bool(self.links.link_up[index])

    def telemetry(self, index: int) -> dict[str, Any]:
        """Car ``index``'s telemetry as a ``Telemetry``-compatible dict (camelCase)."""
        return self.telemetry_many([index])[0]

    def telemetry_many(
        self, indices: Sequence[int] | npt.NDArray[np.integer] | None = None
    ) -> list[dict[str, Any]]:
        """Telemetry dicts for ``indices`` (all cars when None), built in bulk."""
        idx = np.arange(self.n) if indices is None else np.asarray(indices, dtype=np.int64)
        observed_at = self.now.isoformat()
        cols = zip(
            self.state_of_charge[idx].tolist(),
            self.plugged_in[idx].tolist(),
            self.charging[idx].tolist(),
            self.drive_state[idx].tolist(),
            np.clip(self.battery_temperature_c[idx], -60.0, 150.0).tolist(),
            np.clip(self.compute_temperature_c[idx], -60.0, 150.0).tolist(),
            self.link_quality[idx].tolist(),
            strict=True,
        )
        return [
            {
                "stateOfCharge": soc,
                "pluggedIn": plugged,
                "charging": charging,
                "driveState": DRIVE_STATES[ds],
                "batteryTemperatureC": bt,
                "computeTemperatureC": ct,
                "linkQuality": lq,
                "observedAt": observed_at,
            }
            for soc, plugged, charging, ds, bt, ct, lq in cols
        ]

    def snapshot(self) -> dict[str, np.ndarray]:
        """Copies of the state and meter arrays (for determinism checks and reports)."""
        names = (
            "state_of_charge", "plugged_in", "charging", "drive_state", "speed_kmh", "battery_temperature_c",
            "compute_temperature_c", "link_quality", "work_energy_kwh", "battery_discharged_kwh",
            "battery_charged_kwh", "grid_energy_kwh", "drive_energy_kwh", "odometer_km",
        )  # fmt: skip
        return {k: getattr(self, k).copy() for k in names}


class SimulatedCar:
    """One SIMULATED car: a handle on row ``index`` of a ``SimulatedFleet``.

    ``SimulatedCar.standalone()`` makes a fleet of one for a lone simulated agent. ``step`` advances the whole
    fleet the car belongs to.
    """

    __slots__ = ("fleet", "index")

    def __init__(self, fleet: SimulatedFleet, index: int) -> None:
        if not 0 <= index < fleet.n:
            raise IndexError(f"no simulated car {index} in a fleet of {fleet.n}")
        self.fleet = fleet
        self.index = index

    @classmethod
    def standalone(
        cls,
        spec: VehicleNodeSpec | None = None,
        *,
        seed: int = 0,
        schedules: bool = False,
        connectivity: ConnectivityConfig | None = None,
        start: datetime = DEFAULT_START,
        **traits: float | bool,
    ) -> SimulatedCar:
        """A simulated car in a fleet of its own; ``traits`` set ``CarTraits`` fields (e.g. ``initial_soc``)."""
        spec = spec or make_vehicle_specs(1, seed)[0]
        drawn = CarTraits.draw(np.random.default_rng([int(seed), 0x7A175]), [spec.region])
        unknown = set(traits) - {f.name for f in fields(CarTraits)}
        if unknown:
            raise TypeError(f"unknown car traits: {sorted(unknown)}")
        fleet = SimulatedFleet(
            [spec], seed=seed, schedules=schedules, connectivity=connectivity, start=start,
            traits=drawn.with_values(**traits),
        )  # fmt: skip
        return cls(fleet, 0)

    @property
    def vehicle_id(self) -> str:
        return self.fleet.vehicle_ids[self.index]

    @property
    def spec(self) -> VehicleNodeSpec:
        return self.fleet.specs[self.index]

    @property
    def state_of_charge(self) -> float:
        return float(self.fleet.state_of_charge[self.index])

    @property
    def plugged_in(self) -> bool:
        return bool(self.fleet.plugged_in[self.index])

    @property
    def charging(self) -> bool:
        return bool(self.fleet.charging[self.index])

    @property
    def drive_state(self) -> DriveState:
        return DRIVE_STATES[int(self.fleet.drive_state[self.index])]

    @property
    def battery_temperature_c(self) -> float:
        return float(self.fleet.battery_temperature_c[self.index])

    @property
    def compute_temperature_c(self) -> float:
        return float(self.fleet.compute_temperature_c[self.index])

    @property
    def link_quality(self) -> float:
        return float(self.fleet.link_quality[self.index])

    @property
    def connected(self) -> bool:
        return self.fleet.connected(self.index)

    @property
    def ambient_c(self) -> float:
        return float(self.fleet.ambient_c()[self.index])

    def meter(self, name: str) -> float:
        """A cumulative meter: ``work_energy_kwh``, ``battery_discharged_kwh``, ``grid_energy_kwh``, ..."""
        return float(getattr(self.fleet, name)[self.index])

    def step(self, dt_s: float) -> list[DriveStateChange]:
        return self.fleet.step(dt_s)

    def set_work(self, load: float) -> None:
        self.fleet.set_work(self.index, load)

    def set_drive_state(self, state: DriveState, *, speed_kmh: float = DEFAULT_MANUAL_SPEED_KMH) -> None:
        self.fleet.set_drive_state(self.index, state, speed_kmh=speed_kmh)

    def set_plugged_in(self, plugged_in: bool, *, charger_w: float | None = None) -> None:
        self.fleet.set_plugged_in(self.index, plugged_in, charger_w=charger_w)

    def set_state_of_charge(self, state_of_charge: float) -> None:
        self.fleet.set_state_of_charge(self.index, state_of_charge)

    def set_temperatures(self, *, battery_c: float | None = None, compute_c: float | None = None) -> None:
        self.fleet.set_temperatures(self.index, battery_c=battery_c, compute_c=compute_c)

    def watch(self, callback: Callable[[int, int], None]) -> Callable[[], None]:
        return self.fleet.watch(self.index, callback)

    def telemetry(self) -> dict[str, Any]:
        return self.fleet.telemetry(self.index)
