"""The car's own work-energy meter, on a clock the test moves: per assignment and per local day of the owner.

What a user relies on: an owner is paid for, and capped by, computePowerW × load + idlePowerW for exactly the
time work ran; it is split fairly between the shards that ran together; the day restarts at the owner's local
midnight (not UTC's); a restarted agent does not hand the owner's cap a fresh day; a clock stepping back never
counts time twice.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from fleetlet_car.energy import EnergyMeter


class Clock:
    def __init__(self, at: datetime) -> None:
        self.now = at.timestamp()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


def test_energy_is_compute_power_times_load_plus_idle_while_work_runs_and_nothing_otherwise() -> None:
    clock = Clock(at("2025-06-02T10:00:00+00:00"))
    meter = EnergyMeter(160.0, 40.0, clock=clock)
    clock.advance(3600)  # nothing runs: the car is asleep, no work energy
    assert meter.today() == (0.0, "2025-06-02")
    meter.start("a")
    clock.advance(1800)  # 0.5 h at 160 W + 40 W
    assert meter.assignment_kwh("a") == pytest.approx(0.1)
    meter.stop("a")
    clock.advance(3600)
    assert meter.today()[0] == pytest.approx(0.1) and meter.total_kwh() == pytest.approx(0.1)


def test_shards_running_together_share_the_draw() -> None:
    clock = Clock(at("2025-06-02T10:00:00+00:00"))
    meter = EnergyMeter(100.0, 20.0, work_load=0.5, clock=clock)  # a shard uses half the computer
    meter.start("a")
    clock.advance(3600)  # alone: 100 × 0.5 + 20 = 70 W
    meter.start("b")
    clock.advance(3600)  # together: 100 × 1.0 + 20 = 120 W, 60 W each
    meter.stop("a")
    meter.stop("b")
    assert meter.assignment_kwh("a") == pytest.approx(0.070 + 0.060)
    assert meter.assignment_kwh("b") == pytest.approx(0.060)
    assert meter.today()[0] == pytest.approx(0.190)
    meter.forget("a")
    assert meter.assignment_kwh("a") == 0.0


def test_the_day_restarts_at_the_owners_local_midnight() -> None:
    # 21:30 UTC is 23:30 in Berlin (summer time): the owner's day ends 30 minutes later, at 22:00 UTC.
    clock = Clock(at("2025-06-02T21:30:00+00:00"))
    meter = EnergyMeter(100.0, 0.0, timezone="Europe/Berlin", clock=clock)
    meter.start("a")
    clock.advance(3600)  # 30 min on Monday, 30 min on Tuesday (local)
    kwh, day = meter.today()
    assert day == "2025-06-03" and kwh == pytest.approx(0.05)
    assert meter.assignment_kwh("a") == pytest.approx(0.1)  # the assignment's figure does not reset
    meter.stop("a")
    clock.advance(24 * 3600)
    assert meter.today() == (0.0, "2025-06-04")


def test_how_long_until_the_owners_cap_is_reached_at_the_present_draw() -> None:
    clock = Clock(at("2025-06-02T10:00:00+00:00"))
    meter = EnergyMeter(150.0, 50.0, clock=clock)
    assert meter.seconds_until_today_reaches(1.0) is None  # nothing draws power: never
    meter.start("a")
    clock.advance(3600)
    assert meter.seconds_until_today_reaches(1.0) == pytest.approx(4 * 3600)  # 0.8 kWh more at 200 W
    assert meter.seconds_until_today_reaches(0.1) == 0.0


def test_a_restarted_agent_keeps_todays_figure_but_not_yesterdays() -> None:
    clock = Clock(at("2025-06-02T10:00:00+00:00"))
    meter = EnergyMeter(100.0, clock=clock)
    meter.start("a")
    clock.advance(3600)
    saved = meter.snapshot()
    assert saved == {"day": "2025-06-02", "kwhToday": pytest.approx(0.1)}
    again = EnergyMeter(100.0, clock=clock)
    again.restore(saved)
    assert again.today()[0] == pytest.approx(0.1)
    clock.advance(24 * 3600)
    tomorrow = EnergyMeter(100.0, clock=clock)
    tomorrow.restore(saved)
    assert tomorrow.today() == (0.0, "2025-06-03")


def test_a_clock_stepping_back_counts_nothing_twice_and_a_new_zone_keeps_todays_figure() -> None:
    clock = Clock(at("2025-06-02T10:00:00+00:00"))
    meter = EnergyMeter(100.0, clock=clock)
    meter.start("a")
    clock.advance(3600)
    assert meter.today()[0] == pytest.approx(0.1)
    clock.advance(-1800)  # NTP stepped the clock back
    assert meter.today()[0] == pytest.approx(0.1)
    clock.advance(1800)
    assert meter.today()[0] == pytest.approx(0.1)
    meter.set_timezone("Asia/Tokyo")  # 19:00 local, the same day: the figure carries over
    kwh, day = meter.today()
    assert kwh == pytest.approx(0.1) and day == "2025-06-02"
    meter.set_timezone("No/Such_Zone")  # an owner's typo reads as UTC rather than failing
    assert meter.today()[1] == "2025-06-02"
