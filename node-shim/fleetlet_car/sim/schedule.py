"""Seeded driving and plug-in schedules for SIMULATED cars.

Each simulated car gets a driver profile (commuter, flexible errand-runner, or rarely drives) and personal
habits drawn once from the seed (commute distance, usual departure and return times, whether and how often it
is plugged in at home). Each local day is then drawn from its own seeded stream, so day 7 is the same whatever
the step size or however many days were simulated before it.

A trip is a sequence of legs; each leg has a ``prepare_s`` (cabin preconditioning, the owner walking up: the
car is no longer Parked), a ``depart_s`` and an ``arrive_s``. Legs of one car never overlap. Times are seconds
on the fleet clock (UTC, 0 = the simulation's start at midnight UTC); habits are in each car's local time.

This module must never read a real car's data or a clock: it is pure, seeded, and vectorised over cars.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from enum import IntEnum

import numpy as np
import numpy.typing as npt

from .physics import HOME_CHARGER_W, S_PER_H

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

_DAY_STREAM = 1_000_000  # offsets day indices (which may be -1) into non-negative seed words
_MIN_GAP_S = 60.0  # between one leg's arrival and the next leg's preparation


class DriverProfile(IntEnum):
    COMMUTER = 0  # weekday commute, evening errands, weekend trips
    FLEXIBLE = 1  # no commute; daytime errands most days
    RARE = 2  # the car mostly sits


PROFILE_SHARES = (0.6, 0.28, 0.12)


@dataclass(frozen=True, slots=True)
class DriverHabits:
    """Per-car habits, one array element per car, drawn once from the seed."""

    profile: npt.NDArray[np.int8]
    utc_offset_h: FloatArray
    commute_km: FloatArray
    depart_h: FloatArray  # usual morning departure, local
    return_h: FloatArray  # usual evening departure from work, local
    plug_probability: FloatArray  # chance of plugging in at home on a given evening
    home_charger_w: FloatArray  # 0: no charger at home
    work_charger_w: FloatArray  # 0: no charging at work

    def __len__(self) -> int:
        return len(self.profile)

    @classmethod
    def draw(cls, rng: np.random.Generator, utc_offset_h: FloatArray) -> DriverHabits:
        n = len(utc_offset_h)
        profile = rng.choice(3, size=n, p=PROFILE_SHARES).astype(np.int8)
        commuter = profile == DriverProfile.COMMUTER
        home_charger = rng.choice(
            np.array([HOME_CHARGER_W[0], HOME_CHARGER_W[1], 0.0]), size=n, p=[0.6, 0.25, 0.15]
        )
        # Only commuters live without a home charger: they charge at work instead.
        home_charger = np.where(~commuter & (home_charger == 0.0), HOME_CHARGER_W[0], home_charger)
        work_charger = np.where(
            home_charger == 0.0, 11000.0, np.where(rng.random(n) < 0.2, HOME_CHARGER_W[0], 0.0)
        )
        work_charger = np.where(commuter, work_charger, 0.0)
        plug_probability = rng.choice(np.array([0.95, 0.6, 0.3]), size=n, p=[0.7, 0.2, 0.1])
        return cls(
            profile=profile,
            utc_offset_h=np.asarray(utc_offset_h, dtype=np.float64),
            commute_km=np.clip(rng.lognormal(np.log(15.0), 0.6, n), 2.0, 50.0),
            depart_h=np.clip(rng.normal(7.75, 0.6, n), 6.25, 9.25),
            return_h=np.clip(rng.normal(17.25, 0.5, n), 15.5, 18.0),
            plug_probability=plug_probability,
            home_charger_w=home_charger,
            work_charger_w=work_charger,
        )


@dataclass(frozen=True, slots=True)
class Legs:
    """Legs of trips, one row per leg, sorted by car then time."""

    car: IntArray
    prepare_s: FloatArray
    depart_s: FloatArray
    arrive_s: FloatArray
    distance_km: FloatArray
    to_home: BoolArray
    plug_on_arrival: BoolArray
    charger_w: FloatArray  # the charger at the destination (used when plug_on_arrival)

    def __len__(self) -> int:
        return len(self.car)

    @property
    def speed_kmh(self) -> FloatArray:
        return self.distance_km / np.maximum((self.arrive_s - self.depart_s) / S_PER_H, 1e-9)

    @classmethod
    def concat(cls, parts: list[Legs]) -> Legs:
        if not parts:
            return cls(
                *(np.zeros(0, dtype=d) for d in (np.int64,) + (np.float64,) * 4 + (bool, bool, np.float64))
            )
        return cls(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(cls)))

    def take(self, index: npt.NDArray[np.intp] | BoolArray) -> Legs:
        return Legs(*(getattr(self, f.name)[index] for f in fields(self)))


@dataclass(frozen=True, slots=True)
class DaySchedule:
    """One local day for every car: its legs, and the evening moments a car parked at home gets plugged in."""

    day: int
    legs: Legs
    plug_car: IntArray
    plug_at_s: FloatArray


def _urban_speed_kmh(km: FloatArray) -> FloatArray:
    """Average speed of a leg: short legs are slow town driving, longer ones use faster roads."""
    return np.clip(22.0 + 1.1 * km, 25.0, 90.0)


class DrivingSchedule:
    """Draws each local day's legs for every car from ``seed``; see the module docstring."""

    def __init__(self, habits: DriverHabits, seed: int, start_weekday: int = 0) -> None:
        self.habits = habits
        self._seed = int(seed)
        self._start_weekday = int(start_weekday)

    def weekday(self, day: int) -> int:
        """0 = Monday for local day ``day`` (0 = the start date)."""
        return (self._start_weekday + day) % 7

    def day(self, day: int) -> DaySchedule:
        rng = np.random.default_rng([self._seed, _DAY_STREAM + day])
        h = self.habits
        n = len(h)
        base_h = day * 24.0 - h.utc_offset_h  # fleet-clock hour of this car's local midnight
        weekend = self.weekday(day) >= 5
        profile = h.profile
        commuter = profile == DriverProfile.COMMUTER
        flexible = profile == DriverProfile.FLEXIBLE
        rare = profile == DriverProfile.RARE
        parts: list[Legs] = []

        def round_trip(
            mask: BoolArray,
            depart_h: FloatArray,
            km: FloatArray,
            dwell_h: FloatArray,
            speed_kmh: FloatArray,
            charger_away_w: FloatArray | None = None,
        ) -> None:
            cars = np.flatnonzero(mask)
            if cars.size == 0:
                return
            dep, d, dwell, v = depart_h[cars], km[cars], dwell_h[cars], speed_kmh[cars]
            travel_h = d / v
            lead_out_h = rng.uniform(3.0, 15.0, cars.size) / 60.0
            lead_back_h = rng.uniform(1.0, 5.0, cars.size) / 60.0
            out_arrive = dep + travel_h
            back_depart = out_arrive + dwell
            back_arrive = back_depart + travel_h
            away_w = np.zeros(cars.size) if charger_away_w is None else charger_away_w[cars]
            # Plugged in at home on arrival: likelier in the evening, never without a charger.
            evening = back_arrive >= 16.0
            p = h.plug_probability[cars] * np.where(evening, 1.0, 0.3)
            plug_home = (rng.random(cars.size) < p) & (h.home_charger_w[cars] > 0.0)
            b = base_h[cars]
            for prep, depart, arrive, home, plug, charger in (
                (dep - lead_out_h, dep, out_arrive, False, away_w > 0.0, away_w),
                (
                    back_depart - lead_back_h,
                    back_depart,
                    back_arrive,
                    True,
                    plug_home,
                    h.home_charger_w[cars],
                ),
            ):
                parts.append(
                    Legs(
                        car=cars.astype(np.int64),
                        prepare_s=(b + prep) * S_PER_H,
                        depart_s=(b + depart) * S_PER_H,
                        arrive_s=(b + arrive) * S_PER_H,
                        distance_km=d.copy(),
                        to_home=np.full(cars.size, home),
                        plug_on_arrival=np.asarray(plug, dtype=bool),
                        charger_w=np.asarray(charger, dtype=np.float64),
                    )
                )

        def errand_km() -> FloatArray:
            return np.clip(rng.lognormal(np.log(5.0), 0.6, n), 1.0, 25.0)

        def jitter_h(sd_min: float, cap_min: float) -> FloatArray:
            return np.clip(rng.normal(0.0, sd_min, n), -cap_min, cap_min) / 60.0

        if not weekend:
            # Commute: out in the morning, back in the evening, both with daily jitter; a few days off.
            goes = commuter & (rng.random(n) >= 0.05)
            km = h.commute_km
            v = _urban_speed_kmh(km)
            out_h = h.depart_h + jitter_h(10.0, 25.0)
            work_h = (h.return_h + jitter_h(10.0, 25.0)) - (out_h + km / v)
            round_trip(goes, out_h, km, work_h, v, charger_away_w=h.work_charger_w)
            km = errand_km()
            round_trip(
                commuter & (rng.random(n) < 0.25),
                rng.uniform(19.5, 20.5, n),
                km,
                rng.uniform(0.3, 1.0, n),
                _urban_speed_kmh(km),
            )
            km = errand_km()
            round_trip(
                flexible & (rng.random(n) < 0.7),
                rng.uniform(10.0, 11.5, n),
                km,
                rng.uniform(0.3, 1.5, n),
                _urban_speed_kmh(km),
            )
            km = errand_km()
            round_trip(
                flexible & (rng.random(n) < 0.3),
                rng.uniform(14.0, 16.0, n),
                km,
                rng.uniform(0.3, 1.5, n),
                _urban_speed_kmh(km),
            )
        else:
            active = ~rare
            km = errand_km()
            round_trip(
                active & (rng.random(n) < 0.5),
                rng.uniform(9.5, 11.5, n),
                km,
                rng.uniform(0.3, 1.2, n),
                _urban_speed_kmh(km),
            )
            long_trip = active & (rng.random(n) < 0.12)
            round_trip(
                long_trip,
                rng.uniform(12.5, 13.5, n),
                rng.uniform(60.0, 180.0, n),
                rng.uniform(1.0, 3.0, n),
                rng.uniform(85.0, 100.0, n),
            )
            km = errand_km()
            round_trip(
                active & ~long_trip & (rng.random(n) < 0.3),
                rng.uniform(14.5, 16.5, n),
                km,
                rng.uniform(0.3, 1.5, n),
                _urban_speed_kmh(km),
            )
        km = errand_km()
        round_trip(
            rare & (rng.random(n) < 0.1),
            rng.uniform(10.0, 15.0, n),
            km,
            rng.uniform(0.3, 1.0, n),
            _urban_speed_kmh(km),
        )

        legs = _without_overlaps(Legs.concat(parts))
        # The nightly plug-in: a car parked at home without a cable gets one late in the evening.
        plugs = (rng.random(n) < h.plug_probability) & (h.home_charger_w > 0.0)
        plug_car = np.flatnonzero(plugs).astype(np.int64)
        plug_at_s = (base_h[plug_car] + rng.uniform(22.25, 23.5, plug_car.size)) * S_PER_H
        return DaySchedule(day=day, legs=legs, plug_car=plug_car, plug_at_s=plug_at_s)


def _without_overlaps(legs: Legs) -> Legs:
    """Sort by car and time and push any leg that would start before the previous one ended later."""
    order = np.lexsort((legs.prepare_s, legs.car))
    legs = legs.take(order)
    prepare, depart, arrive = legs.prepare_s.copy(), legs.depart_s.copy(), legs.arrive_s.copy()
    same_car = np.zeros(len(legs), dtype=bool)
    same_car[1:] = legs.car[1:] == legs.car[:-1]
    for _ in range(16):  # each pass settles one more leg of a chain; a car has at most ~6 legs a day
        overlap = np.zeros(len(legs))
        overlap[1:] = np.where(same_car[1:], arrive[:-1] + _MIN_GAP_S - prepare[1:], 0.0)
        overlap = np.maximum(overlap, 0.0)
        if not overlap.any():
            break
        prepare += overlap
        depart += overlap
        arrive += overlap
    return Legs(
        legs.car,
        prepare,
        depart,
        arrive,
        legs.distance_km,
        legs.to_home,
        legs.plug_on_arrival,
        legs.charger_w,
    )
