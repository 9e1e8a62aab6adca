"""Seeded schedules drive simulated cars plausibly: weekday commutes, weekends, plug-ins, Preparing."""

from __future__ import annotations

import numpy as np
from fleetlet_car.sim import DriverHabits, DriverProfile, DrivingSchedule, SimulatedFleet
from fleetlet_car.sim.connectivity import ConnectivityConfig, ConnectivityModel


def schedule(n: int = 2000, seed: int = 7) -> DrivingSchedule:
    habits = DriverHabits.draw(np.random.default_rng(seed), np.zeros(n))
    return DrivingSchedule(habits, seed=seed, start_weekday=0)  # day 0 is a Monday


def test_weekday_commuters_leave_in_the_morning_and_return_in_the_evening() -> None:
    s = schedule()
    day = s.day(2)  # Wednesday
    commuters = np.flatnonzero(s.habits.profile == DriverProfile.COMMUTER)
    legs = day.legs
    hour = legs.depart_s / 3600.0 - 48.0
    commuting = np.isin(legs.car, commuters)
    morning = commuting & (hour < 12.0)
    drove = np.unique(legs.car[morning])
    assert 0.9 * len(commuters) <= len(drove) <= len(commuters)  # a few days off
    mornings = hour[morning]
    assert np.all((mornings >= 5.5) & (mornings <= 10.0))
    assert 7.0 <= np.median(mornings) <= 8.5
    assert len(mornings) == len(drove)  # one morning leg each: the commute out
    # Every commuter who left came home in the evening, with the same distance both ways.
    for car in drove[:200]:
        mine = legs.take(legs.car == car)
        home = np.flatnonzero(mine.to_home)
        assert mine.to_home[1] and 15.0 <= mine.depart_s[1] / 3600.0 - 48.0 <= 19.5
        assert mine.distance_km[0] == mine.distance_km[1]
        assert home.size == len(mine) // 2


def test_legs_never_overlap_and_preparing_comes_before_departure() -> None:
    s = schedule()
    for d in range(7):
        legs = s.day(d).legs
        assert np.all(legs.prepare_s < legs.depart_s) and np.all(legs.depart_s < legs.arrive_s)
        lead_min = (legs.depart_s - legs.prepare_s) / 60.0
        assert lead_min.min() >= 1.0 and lead_min.max() <= 15.0
        same = legs.car[1:] == legs.car[:-1]
        assert np.all(legs.prepare_s[1:][same] >= legs.arrive_s[:-1][same])
        speeds = legs.speed_kmh
        assert speeds.min() >= 20.0 and speeds.max() <= 110.0


def test_weekends_differ_and_rare_drivers_rarely_drive() -> None:
    s = schedule()
    commuters = s.habits.profile == DriverProfile.COMMUTER
    rare = np.flatnonzero(s.habits.profile == DriverProfile.RARE)
    weekday_morning = [s.day(d).legs for d in range(5)]
    weekend = [s.day(d).legs for d in (5, 6)]

    # No commute at the weekend: far fewer commuters leave before 9:00.
    def early(legs, d: int) -> np.ndarray:
        return np.isin(legs.car[(legs.depart_s / 3600 - 24 * d) < 9.0], np.flatnonzero(commuters))

    assert sum(early(legs, d).sum() for d, legs in zip((5, 6), weekend, strict=True)) < 0.05 * sum(
        early(legs, d).sum() for d, legs in enumerate(weekday_morning)
    )
    weekend_km = np.concatenate([legs.distance_km for legs in weekend])
    assert weekend_km.max() >= 60.0  # some weekend trips
    rare_legs = sum(np.isin(s.day(d).legs.car, rare).sum() for d in range(7))
    assert rare_legs / 2 <= 0.2 * len(rare) * 7


def test_most_cars_with_a_charger_plug_in_at_night() -> None:
    fleet = SimulatedFleet.generate(1000, seed=21)
    charger = fleet.habits.home_charger_w > 0
    for _ in range(24 * 2 + 1):  # to Wednesday 01:00 UTC
        fleet.step(1800.0)
    at_home_parked = (fleet.drive_state == 0) & fleet.at_home
    share = fleet.plugged_in[charger & at_home_parked].mean()
    assert share >= 0.7


def test_fleet_reports_drive_state_changes_including_preparing() -> None:
    fleet = SimulatedFleet.generate(500, seed=4)
    seen: list[tuple[str, str]] = []
    for _ in range(24 * 60):
        seen += [(c.previous, c.current) for c in fleet.step(60.0)]
    assert (
        ("Parked", "Preparing") in seen and ("Preparing", "Driving") in seen and ("Driving", "Parked") in seen
    )
    assert ("Parked", "Driving") not in seen  # a trip always starts with preparation
    assert fleet.work_while_not_parked_s.sum() == 0.0


def test_watchers_hear_changes_synchronously() -> None:
    fleet = SimulatedFleet.generate(10, seed=1, schedules=False)
    heard: list[tuple[int, str]] = []
    unwatch = fleet.watch(3, lambda i, _ns: heard.append((i, str(fleet.car(i).drive_state))))
    fleet.set_drive_state(3, "Driving")
    assert heard == [(3, "Driving")]
    fleet.set_drive_state(4, "Driving")
    assert len(heard) == 1
    unwatch()
    fleet.step(1.0)
    assert len(heard) == 1


def test_link_outages_and_vanishing_follow_their_rates() -> None:
    n = 5000
    model = ConnectivityModel(n, np.random.default_rng(2), ConnectivityConfig(
        outage_rate_per_h=1.0, outage_median_s=30.0, vanish_rate_per_h=0.01))  # fmt: skip
    down_samples = []
    for k in range(1, 361):  # one hour in 10 s steps
        model.step(k * 10.0)
        down_samples.append((~model.link_up & ~model.vanished).mean())
    assert 0.7 * n <= model.outages_total <= 1.3 * n
    assert 0.0 < np.mean(down_samples) < 0.05  # ~1/h x ~45 s mean outage
    assert 0.5 * 0.01 * n <= model.vanished.sum() <= 1.5 * 0.01 * n
    q = model.quality(3600.0, np.zeros(n, dtype=bool))
    assert np.all(q[model.vanished] == 0.0) and 0.6 < q[model.link_up].mean() <= 1.0
