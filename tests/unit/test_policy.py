"""The owner's rules as one pure function (fleetlet.policy): taints, hysteresis, hours, energy, conditions."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import pytest

from fleetlet.api.v1alpha1 import taints as tk
from fleetlet.api.v1alpha1.vehiclenode import ConditionType, Policy, Reason, Telemetry
from fleetlet.policy import CarPolicy, Hysteresis, evaluate

MON_NOON = datetime(2025, 6, 2, 12, 0, tzinfo=UTC)  # a Monday
SPRING_FORWARD = "2025-03-30"  # Europe/Berlin: 02:00 CET -> 03:00 CEST at 01:00 UTC
FALL_BACK = "2025-10-26"  # Europe/Berlin: 03:00 CEST -> 02:00 CET at 01:00 UTC
NIGHT_MON = {"days": ["Mon"], "start": "22:00", "end": "06:00"}


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def owner(**rules: Any) -> Policy:
    return Policy.model_validate(rules)


def reading(**fields: Any) -> Telemetry:
    body: dict[str, Any] = {
        "state_of_charge": 0.8,
        "plugged_in": True,
        "drive_state": "Parked",
        "battery_temperature_c": 25.0,
        "compute_temperature_c": 50.0,
        "observed_at": MON_NOON,
    }
    body.update(fields)
    return Telemetry.model_validate(body)


def replay(policy: Policy, readings: Sequence[dict[str, Any]], **kwargs: Any) -> list[CarPolicy]:
    """Evaluate readings in order, each with the previous result as memory, like the shim does."""
    out: list[CarPolicy] = []
    previous: CarPolicy | None = None
    for fields in readings:
        previous = evaluate(policy, reading(**fields), now=MON_NOON, previous=previous, **kwargs)
        out.append(previous)
    return out


def flips(states: Sequence[bool]) -> int:
    return sum(1 for a, b in zip(states, states[1:], strict=False) if a != b)


def inside(policy: Policy, now: datetime) -> bool:
    return tk.OFF_HOURS not in evaluate(policy, reading(), now=now).taint_keys()


# --- each taint is set when its rule is broken --------------------------------------------------------------


@pytest.mark.parametrize(
    ("rules", "fields", "kwargs", "key", "value"),
    [
        pytest.param({}, {"drive_state": "Driving"}, {}, tk.DRIVING, None, id="driving"),
        pytest.param({}, {"drive_state": "Preparing"}, {}, tk.DRIVING, None, id="preparing-to-drive"),
        pytest.param({}, {"drive_state": "Unknown"}, {}, tk.DRIVING, None, id="drive-state-unknown"),
        pytest.param({}, {"state_of_charge": 0.49}, {}, tk.BATTERY_LOW, None, id="under-the-floor"),
        pytest.param({}, {"state_of_charge": 0.44}, {}, tk.BATTERY_CRITICAL, None, id="under-the-stop-floor"),
        pytest.param({}, {"battery_temperature_c": 40.5}, {}, tk.THERMAL, None, id="battery-over-soft"),
        pytest.param({}, {"compute_temperature_c": 80.5}, {}, tk.THERMAL, None, id="compute-over-soft"),
        pytest.param({}, {"battery_temperature_c": 50.5}, {}, tk.OVERHEAT, None, id="battery-over-hard"),
        pytest.param({}, {"compute_temperature_c": 95.5}, {}, tk.OVERHEAT, None, id="compute-over-hard"),
        pytest.param(
            {"require_plugged_in": True},
            {"plugged_in": False},
            {},
            tk.UNPLUGGED,
            tk.UNPLUGGED_OWNER_REQUIRES_PLUG,
            id="unplugged-owner-requires-plug",
        ),
        pytest.param(
            {"require_plugged_in": False},
            {"plugged_in": False},
            {},
            tk.UNPLUGGED,
            tk.UNPLUGGED_ON_BATTERY,
            id="unplugged-owner-allows-battery",
        ),
        pytest.param({"availability": [NIGHT_MON]}, {}, {}, tk.OFF_HOURS, None, id="outside-window"),
        pytest.param(
            {"max_energy_per_day_kwh": 5.0},
            {"energy_today_kwh": 5.0, "energy_day": "2025-06-02"},
            {},
            tk.ENERGY_CAP,
            None,
            id="energy-cap-reached",
        ),
        pytest.param({}, {}, {"trusted": False}, tk.UNTRUSTED, None, id="untrusted"),
    ],
)
def test_breaking_a_rule_sets_its_taint_with_the_architecture_effect(
    rules: dict[str, Any], fields: dict[str, Any], kwargs: dict[str, Any], key: str, value: str | None
) -> None:
    result = evaluate(owner(**rules), reading(**fields), now=MON_NOON, **kwargs)

    [taint] = [t for t in result.taints if t.key == key]
    assert taint.effect == tk.TAINT_EFFECTS[key]
    assert taint.value == value
    assert not result.schedulable or value == tk.UNPLUGGED_ON_BATTERY


def test_a_healthy_parked_plugged_car_has_no_car_state_taint_and_is_ready() -> None:
    result = evaluate(owner(), reading(), now=MON_NOON)

    assert result.taints == ()
    assert result.schedulable
    assert result.condition(ConditionType.SCHEDULABLE).reason == Reason.READY
    assert dict(result.labels) == {tk.LABEL_SOC_BAND: "8", tk.LABEL_PLUGGED_IN: "true"}
    assert result.next_check_at is None
    assert result.blocking() == () and result.must_drain() == ()


def test_taints_are_sorted_by_key_and_never_include_the_vehicle_marker() -> None:
    result = evaluate(
        owner(availability=[NIGHT_MON]),
        reading(state_of_charge=0.3, plugged_in=False, drive_state="Driving", battery_temperature_c=60),
        now=MON_NOON,
        trusted=False,
    )

    keys = [t.key for t in result.taints]
    assert keys == sorted(keys)
    assert tk.VEHICLE not in keys
    assert set(keys) == set(tk.CAR_STATE_TAINTS) - {tk.ENERGY_CAP}


# --- clearing and hysteresis --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "field", "broken", "held", "cleared"),
    [
        pytest.param(
            tk.BATTERY_LOW, "state_of_charge", 0.49, 0.515, 0.52, id="battery-low-clears-at-floor+2%"
        ),
        pytest.param(
            tk.BATTERY_CRITICAL, "state_of_charge", 0.44, 0.465, 0.47, id="critical-clears-at-stop+2%"
        ),
        pytest.param(
            tk.THERMAL, "battery_temperature_c", 40.5, 38.5, 38.0, id="thermal-battery-clears-at-soft-2"
        ),
        pytest.param(
            tk.THERMAL, "compute_temperature_c", 80.5, 78.5, 78.0, id="thermal-compute-clears-at-soft-2"
        ),
        pytest.param(
            tk.OVERHEAT, "battery_temperature_c", 50.5, 47.5, 47.0, id="overheat-battery-clears-at-hard-3"
        ),
        pytest.param(
            tk.OVERHEAT, "compute_temperature_c", 95.5, 92.5, 92.0, id="overheat-compute-clears-at-hard-3"
        ),
    ],
)
def test_taint_holds_inside_its_hysteresis_band_and_clears_at_the_clear_level(
    key: str, field: str, broken: float, held: float, cleared: float
) -> None:
    policy = owner()
    set_, holding, gone = replay(policy, [{field: broken}, {field: held}, {field: cleared}])

    assert key in set_.taint_keys()
    assert key in holding.taint_keys()
    assert key not in gone.taint_keys()
    # The same in-band reading with no memory does not set it: the band only delays clearing.
    assert key not in evaluate(policy, reading(**{field: held}), now=MON_NOON).taint_keys()


@pytest.mark.parametrize(
    ("key", "broken", "fixed"),
    [
        pytest.param(tk.DRIVING, {"drive_state": "Driving"}, {"drive_state": "Parked"}, id="parked-again"),
        pytest.param(tk.UNPLUGGED, {"plugged_in": False}, {"plugged_in": True}, id="plugged-again"),
    ],
)
def test_drive_and_plug_taints_clear_on_the_next_good_reading(
    key: str, broken: dict[str, Any], fixed: dict[str, Any]
) -> None:
    first, second = replay(owner(), [broken, fixed])

    assert key in first.taint_keys()
    assert key not in second.taint_keys()


@pytest.mark.parametrize(
    ("key", "field", "values", "hysteresis", "expected_flips"),
    [
        pytest.param(
            tk.BATTERY_LOW,
            "state_of_charge",
            [0.51, 0.499, 0.501, 0.499, 0.505, 0.499, 0.515, 0.519, 0.52, 0.519, 0.501, 0.499, 0.52],
            Hysteresis(),
            4,
            id="battery-low-with-hysteresis",
        ),
        pytest.param(
            tk.BATTERY_LOW,
            "state_of_charge",
            [0.51, 0.499, 0.501, 0.499, 0.505, 0.499, 0.515, 0.519, 0.52, 0.519, 0.501, 0.499, 0.52],
            Hysteresis(soc=0.0),
            8,
            id="battery-low-without-hysteresis",
        ),
        pytest.param(
            tk.BATTERY_LOW,
            "state_of_charge",
            [0.5 + 0.004 * (-1) ** i for i in range(20)],
            Hysteresis(),
            1,
            id="battery-low-hovering-at-the-floor",
        ),
        pytest.param(
            tk.BATTERY_LOW,
            "state_of_charge",
            [0.5 + 0.004 * (-1) ** i for i in range(20)],
            Hysteresis(soc=0.0),
            19,
            id="battery-low-hovering-without-hysteresis",
        ),
        pytest.param(
            tk.BATTERY_CRITICAL,
            "state_of_charge",
            [0.46, 0.449, 0.451, 0.449, 0.469, 0.47, 0.449],
            Hysteresis(),
            3,
            id="critical-with-hysteresis",
        ),
        pytest.param(
            tk.BATTERY_CRITICAL,
            "state_of_charge",
            [0.46, 0.449, 0.451, 0.449, 0.469, 0.47, 0.449],
            Hysteresis(soc=0.0),
            5,
            id="critical-without-hysteresis",
        ),
        pytest.param(
            tk.THERMAL,
            "battery_temperature_c",
            [39.9, 40.1, 39.9, 40.1, 38.5, 38.0, 40.1, 37.9],
            Hysteresis(),
            4,
            id="thermal-with-hysteresis",
        ),
        pytest.param(
            tk.THERMAL,
            "battery_temperature_c",
            [39.9, 40.1, 39.9, 40.1, 38.5, 38.0, 40.1, 37.9],
            Hysteresis(temperature_c=0.0),
            6,
            id="thermal-without-hysteresis",
        ),
        pytest.param(
            tk.OVERHEAT,
            "compute_temperature_c",
            [94.9, 95.1, 94.9, 95.1, 92.5, 92.0, 95.1, 91.0],
            Hysteresis(),
            4,
            id="overheat-with-hysteresis",
        ),
        pytest.param(
            tk.OVERHEAT,
            "compute_temperature_c",
            [94.9, 95.1, 94.9, 95.1, 92.5, 92.0, 95.1, 91.0],
            Hysteresis(temperature_c=0.0),
            4,
            id="overheat-keeps-the-reflex-3C-even-when-configured-lower",
        ),
    ],
)
def test_a_reading_hovering_at_a_limit_flips_the_taint_an_exact_bounded_number_of_times(
    key: str, field: str, values: list[float], hysteresis: Hysteresis, expected_flips: int
) -> None:
    results = replay(owner(), [{field: v} for v in values], hysteresis=hysteresis)

    assert flips([key in r.taint_keys() for r in results]) == expected_flips


@pytest.mark.parametrize(
    ("socs", "labels"),
    [
        pytest.param(
            [0.72, 0.70, 0.695, 0.6901, 0.69, 0.695, 0.70, 0.705, 0.7099, 0.71],
            ["7", "7", "7", "7", "6", "6", "6", "6", "6", "7"],
            id="hovering-at-70%-from-above",
        ),
        pytest.param(
            [0.65, 0.70, 0.699, 0.705, 0.71, 0.70],
            ["6", "6", "6", "6", "7", "7"],
            id="hovering-at-70%-from-below",
        ),
        pytest.param([0.55, 0.705], ["5", "6"], id="jump-up-stops-short-of-a-decile-not-yet-1%-inside"),
        pytest.param([0.55, 0.72], ["5", "7"], id="jump-up-into-a-decile-1%-inside"),
        pytest.param([0.85, 0.695], ["8", "7"], id="jump-down-stops-short-of-a-decile-not-yet-1%-inside"),
        pytest.param([0.85, 0.68], ["8", "6"], id="jump-down-into-a-decile-1%-inside"),
        pytest.param(
            [0.95, 0.995, 1.0, 0.995, 0.99, 0.985],
            ["9", "9", "10", "10", "9", "9"],
            id="a-full-battery-is-10",
        ),
        pytest.param(
            [0.0, 0.095, 0.105, 0.11, 0.095, 0.09], ["0", "0", "0", "1", "1", "0"], id="bottom-deciles"
        ),
    ],
)
def test_soc_band_label_moves_only_once_soc_is_1_percent_inside_another_decile(
    socs: list[float], labels: list[str]
) -> None:
    results = replay(owner(), [{"state_of_charge": s} for s in socs])

    assert [r.labels[tk.LABEL_SOC_BAND] for r in results] == labels


def test_soc_band_label_of_a_car_hovering_at_70_percent_never_flips() -> None:
    results = replay(owner(), [{"state_of_charge": 0.70 + 0.004 * (-1) ** i} for i in range(40)])

    assert {r.labels[tk.LABEL_SOC_BAND] for r in results} == {"7"}


@pytest.mark.parametrize(("plugged", "label"), [(True, "true"), (False, "false")])
def test_plugged_in_label_follows_telemetry(plugged: bool, label: str) -> None:
    result = evaluate(owner(require_plugged_in=False), reading(plugged_in=plugged), now=MON_NOON)

    assert result.labels[tk.LABEL_PLUGGED_IN] == label


# --- availability windows -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        pytest.param("2025-06-02T21:59", False, id="mon-21:59-before-start"),
        pytest.param("2025-06-02T22:00", True, id="mon-22:00-start-is-inclusive"),
        pytest.param("2025-06-02T23:30", True, id="mon-23:30"),
        pytest.param("2025-06-03T00:00", True, id="tue-00:00-after-midnight"),
        pytest.param("2025-06-03T05:59", True, id="tue-05:59"),
        pytest.param("2025-06-03T06:00", False, id="tue-06:00-end-is-exclusive"),
        pytest.param("2025-06-03T23:00", False, id="tue-night-is-not-a-start-day"),
        pytest.param("2025-06-02T03:00", False, id="mon-early-belongs-to-sunday-night"),
    ],
)
def test_a_window_crossing_midnight_runs_from_its_start_day_into_the_next(now: str, expected: bool) -> None:
    assert inside(owner(availability=[NIGHT_MON]), utc(now)) is expected


@pytest.mark.parametrize(
    ("zone", "now", "expected"),
    [
        pytest.param("Europe/Berlin", "2025-06-02T20:30", True, id="berlin-summer-22:30-local-inside"),
        pytest.param("UTC", "2025-06-02T20:30", False, id="utc-20:30-outside"),
        pytest.param("Europe/Berlin", "2025-01-06T21:30", True, id="berlin-winter-22:30-local-inside"),
        pytest.param("UTC", "2025-01-06T21:30", False, id="utc-winter-21:30-outside"),
        pytest.param("Europe/Berlin", "2025-06-02T22:30", False, id="berlin-already-tuesday-00:30-outside"),
        pytest.param("UTC", "2025-06-02T22:30", True, id="utc-monday-22:30-inside"),
    ],
)
def test_windows_are_read_in_the_cars_own_zone_not_utc(zone: str, now: str, expected: bool) -> None:
    policy = owner(timezone=zone, availability=[{"days": ["Mon"], "start": "22:00", "end": "23:45"}])

    assert inside(policy, utc(now)) is expected


@pytest.mark.parametrize(
    ("window", "now", "expected"),
    [
        # Spring forward: 02:00-03:00 local does not exist on 2025-03-30.
        pytest.param(
            ("Sun", "02:00", "03:00"), f"{SPRING_FORWARD}T00:59", False, id="spring-gap-window-before"
        ),
        pytest.param(
            ("Sun", "02:00", "03:00"), f"{SPRING_FORWARD}T01:00", False, id="spring-gap-window-at-change"
        ),
        pytest.param(
            ("Sun", "02:00", "03:00"), f"{SPRING_FORWARD}T01:30", False, id="spring-gap-window-after"
        ),
        pytest.param(("Sun", "01:30", "02:30"), f"{SPRING_FORWARD}T00:30", True, id="spring-opens-01:30-cet"),
        pytest.param(
            ("Sun", "01:30", "02:30"), f"{SPRING_FORWARD}T00:59", True, id="spring-open-until-the-gap"
        ),
        pytest.param(
            ("Sun", "01:30", "02:30"), f"{SPRING_FORWARD}T01:00", False, id="spring-end-in-gap-is-03:00"
        ),
        pytest.param(
            ("Sun", "02:30", "04:00"), f"{SPRING_FORWARD}T00:59", False, id="spring-start-in-gap-not-yet"
        ),
        pytest.param(
            ("Sun", "02:30", "04:00"), f"{SPRING_FORWARD}T01:00", True, id="spring-start-in-gap-is-03:00"
        ),
        pytest.param(
            ("Sun", "02:30", "04:00"), f"{SPRING_FORWARD}T02:00", False, id="spring-closes-04:00-cest"
        ),
        pytest.param(
            ("Sat", "22:00", "06:00"), f"{SPRING_FORWARD}T03:59", True, id="spring-night-is-7h-long"
        ),
        pytest.param(
            ("Sat", "22:00", "06:00"), f"{SPRING_FORWARD}T04:00", False, id="spring-night-ends-06:00-cest"
        ),
        # Fall back: 02:00-03:00 local happens twice on 2025-10-26 (00:00-01:00 UTC, then 01:00-02:00 UTC).
        pytest.param(("Sun", "02:30", "05:00"), f"{FALL_BACK}T00:15", False, id="fall-before-first-02:30"),
        pytest.param(("Sun", "02:30", "05:00"), f"{FALL_BACK}T00:30", True, id="fall-opens-at-first-02:30"),
        pytest.param(
            ("Sun", "02:30", "05:00"), f"{FALL_BACK}T01:45", True, id="fall-second-02:45-still-inside"
        ),
        pytest.param(("Sun", "00:00", "02:30"), f"{FALL_BACK}T00:45", False, id="fall-closes-at-first-02:30"),
        pytest.param(
            ("Sun", "00:00", "02:30"), f"{FALL_BACK}T01:30", False, id="fall-second-02:30-does-not-reopen"
        ),
        pytest.param(("Sun", "02:00", "03:00"), f"{FALL_BACK}T01:30", True, id="fall-02-03-spans-both-hours"),
        pytest.param(("Sat", "22:00", "06:00"), f"{FALL_BACK}T04:59", True, id="fall-night-is-9h-long"),
        pytest.param(("Sat", "22:00", "06:00"), f"{FALL_BACK}T05:00", False, id="fall-night-ends-06:00-cet"),
    ],
)
def test_windows_follow_wall_clock_time_across_both_daylight_saving_changes(
    window: tuple[str, str, str], now: str, expected: bool
) -> None:
    day, start, end = window
    policy = owner(timezone="Europe/Berlin", availability=[{"days": [day], "start": start, "end": end}])

    assert inside(policy, utc(now)) is expected


def test_a_window_inside_the_spring_forward_gap_says_it_opens_next_week() -> None:
    policy = owner(
        timezone="Europe/Berlin", availability=[{"days": ["Sun"], "start": "02:00", "end": "03:00"}]
    )

    result = evaluate(policy, reading(), now=utc(f"{SPRING_FORWARD}T00:30"))

    within = result.condition(ConditionType.WITHIN_SCHEDULE)
    assert (within.status, within.reason) == ("False", Reason.OUT_OF_WINDOW)
    assert "the next window opens Sun 2025-04-06 02:00 CEST" in within.message
    assert result.next_check_at == utc("2025-04-06T00:00")


def test_an_unknown_time_zone_is_read_as_utc_and_said_so_without_raising() -> None:
    policy = owner(timezone="Mars/Olympus_Mons", availability=[NIGHT_MON])

    inside_utc = evaluate(policy, reading(), now=utc("2025-06-02T23:00"))
    no_windows = evaluate(owner(timezone="Mars/Olympus_Mons"), reading(), now=MON_NOON)

    assert tk.OFF_HOURS not in inside_utc.taint_keys()
    for result in (inside_utc, no_windows):
        message = result.condition(ConditionType.WITHIN_SCHEDULE).message
        assert "'Mars/Olympus_Mons' is unknown" in message and "UTC" in message


def test_empty_availability_means_any_time() -> None:
    within = evaluate(owner(), reading(), now=MON_NOON).condition(ConditionType.WITHIN_SCHEDULE)

    assert (within.status, within.reason, within.message) == (
        "True",
        Reason.IN_WINDOW,
        "no availability windows: any time",
    )


# --- the energy day -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("zone", "now", "energy_day", "kwh", "cap", "capped"),
    [
        pytest.param("UTC", "2025-06-02T12:00", "2025-06-02", 5.0, 5.0, True, id="at-the-cap-today"),
        pytest.param("UTC", "2025-06-02T12:00", "2025-06-02", 4.99, 5.0, False, id="under-the-cap-today"),
        pytest.param(
            "UTC", "2025-06-02T12:00", "2025-06-01", 9.0, 5.0, False, id="yesterdays-energy-is-a-new-day"
        ),
        pytest.param(
            "UTC", "2025-06-02T12:00", None, 9.0, 5.0, False, id="energy-without-a-day-is-not-today"
        ),
        pytest.param(
            "Europe/Berlin", "2025-06-02T22:30", "2025-06-02", 9.0, 5.0, False, id="berlin-rolled-over"
        ),
        pytest.param(
            "Europe/Berlin", "2025-06-02T22:30", "2025-06-03", 9.0, 5.0, True, id="berlin-local-today"
        ),
        pytest.param("UTC", "2025-06-02T22:30", "2025-06-02", 9.0, 5.0, True, id="utc-still-the-same-day"),
        pytest.param("UTC", "2025-06-02T12:00", None, 0.0, 0.0, True, id="a-zero-cap-allows-no-work"),
    ],
)
def test_energy_cap_counts_only_the_cars_local_day(
    zone: str, now: str, energy_day: str | None, kwh: float, cap: float, capped: bool
) -> None:
    policy = owner(timezone=zone, max_energy_per_day_kwh=cap)

    result = evaluate(policy, reading(energy_today_kwh=kwh, energy_day=energy_day), now=utc(now))

    assert (tk.ENERGY_CAP in result.taint_keys()) is capped
    assert (Reason.ENERGY_CAP in result.must_drain()) is capped


# --- next_check_at ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("zone", "windows", "now", "energy_day", "expected"),
    [
        pytest.param("UTC", [], "2025-06-02T12:00", None, None, id="nothing-time-driven"),
        pytest.param("UTC", [NIGHT_MON], "2025-06-02T12:00", None, "2025-06-02T22:00", id="next-opening"),
        pytest.param(
            "UTC", [NIGHT_MON], "2025-06-02T23:00", None, "2025-06-03T06:00", id="closing-after-midnight"
        ),
        pytest.param(
            "UTC", [NIGHT_MON], "2025-06-02T22:00", None, "2025-06-03T06:00", id="at-a-boundary-the-next"
        ),
        pytest.param("UTC", [NIGHT_MON], "2025-06-03T06:00", None, "2025-06-09T22:00", id="next-week"),
        pytest.param(
            "Europe/Berlin",
            [{"start": "02:30", "end": "04:00"}],
            f"{SPRING_FORWARD}T00:30",
            None,
            f"{SPRING_FORWARD}T01:00",
            id="spring-start-in-gap",
        ),
        pytest.param(
            "Europe/Berlin",
            [{"start": "02:30", "end": "04:00"}],
            f"{SPRING_FORWARD}T01:00",
            None,
            f"{SPRING_FORWARD}T02:00",
            id="spring-close-after-gap",
        ),
        pytest.param(
            "Europe/Berlin",
            [{"start": "02:30", "end": "04:00"}],
            "2025-10-25T23:30",
            None,
            f"{FALL_BACK}T00:30",
            id="fall-first-02:30",
        ),
        pytest.param(
            "Europe/Berlin",
            [{"start": "02:30", "end": "04:00"}],
            f"{FALL_BACK}T00:30",
            None,
            f"{FALL_BACK}T03:00",
            id="fall-closes-04:00-cet",
        ),
        pytest.param(
            "Europe/Berlin", [], "2025-03-29T22:30", "2025-03-29", "2025-03-29T23:00", id="cap-cet-midnight"
        ),
        pytest.param(
            "Europe/Berlin",
            [],
            f"{SPRING_FORWARD}T12:00",
            SPRING_FORWARD,
            "2025-03-30T22:00",
            id="cap-23h-day",
        ),
        pytest.param(
            "Europe/Berlin", [], f"{FALL_BACK}T12:00", FALL_BACK, "2025-10-26T23:00", id="cap-25h-day"
        ),
        pytest.param(
            "America/Santiago",
            [],
            "2025-09-06T16:00",
            "2025-09-06",
            "2025-09-07T04:00",
            id="cap-midnight-in-a-gap",
        ),
        pytest.param(
            "UTC",
            [{"start": "23:30", "end": "23:45"}],
            "2025-06-02T12:00",
            "2025-06-02",
            "2025-06-02T23:30",
            id="window-before-midnight-rollover",
        ),
        pytest.param(
            "UTC",
            [{"days": ["Tue"], "start": "09:00", "end": "10:00"}],
            "2025-06-02T12:00",
            "2025-06-02",
            "2025-06-03T00:00",
            id="midnight-rollover-before-window",
        ),
    ],
)
def test_next_check_at_is_the_next_instant_the_result_can_change_by_time_alone(
    zone: str, windows: list[dict[str, Any]], now: str, energy_day: str | None, expected: str | None
) -> None:
    policy = owner(timezone=zone, availability=windows, max_energy_per_day_kwh=5.0)
    telemetry = reading(energy_today_kwh=6.0 if energy_day else 0.0, energy_day=energy_day)

    result = evaluate(policy, telemetry, now=utc(now))

    assert result.next_check_at == (utc(expected) if expected else None)
    if result.next_check_at is not None:
        assert result.next_check_at > utc(now)


def test_following_next_check_at_walks_every_boundary_of_a_week_in_berlin() -> None:
    policy = owner(
        timezone="Europe/Berlin",
        availability=[NIGHT_MON, {"days": ["Sat", "Sun"], "start": "09:00", "end": "17:00"}],
    )
    now, seen = utc("2025-03-24T00:00"), []  # Mon; the week holds the spring-forward Sunday
    while now < utc("2025-03-31T00:00"):
        result = evaluate(policy, reading(), now=now)
        assert result.next_check_at is not None and result.next_check_at > now
        seen.append((now.isoformat(), tk.OFF_HOURS not in result.taint_keys()))
        now = result.next_check_at

    assert seen == [
        ("2025-03-24T00:00:00+00:00", False),
        ("2025-03-24T21:00:00+00:00", True),  # Mon 22:00 CET
        ("2025-03-25T05:00:00+00:00", False),  # Tue 06:00 CET
        ("2025-03-29T08:00:00+00:00", True),  # Sat 09:00 CET
        ("2025-03-29T16:00:00+00:00", False),
        ("2025-03-30T07:00:00+00:00", True),  # Sun 09:00 CEST
        ("2025-03-30T15:00:00+00:00", False),
    ]


# --- pause, trust, link -------------------------------------------------------------------------------------


def test_paused_cordons_without_a_taint_and_drains_running_work() -> None:
    result = evaluate(owner(), reading(), now=MON_NOON, paused=True)

    assert result.cordoned
    assert result.taints == ()
    schedulable = result.condition(ConditionType.SCHEDULABLE)
    assert (schedulable.status, schedulable.reason) == ("False", Reason.OWNER_PAUSED)
    assert result.blocking() == (Reason.OWNER_PAUSED,)
    assert result.must_drain() == (Reason.OWNER_PAUSED,)


def test_untrusted_taints_the_car_but_is_not_an_owner_rule() -> None:
    result = evaluate(owner(), reading(), now=MON_NOON, trusted=False)

    assert result.taint_keys() == {tk.UNTRUSTED}
    schedulable = result.condition(ConditionType.SCHEDULABLE)
    assert (schedulable.status, schedulable.reason) == ("False", Reason.UNTRUSTED)
    assert result.blocking() == ()
    assert result.must_drain() == ()


def test_link_down_is_a_condition_not_a_taint() -> None:
    result = evaluate(owner(), reading(), now=MON_NOON, connected=False)

    connected = result.condition(ConditionType.CONNECTED)
    assert (connected.status, connected.reason) == ("False", Reason.LINK_DOWN)
    assert result.taints == ()
    assert result.condition(ConditionType.SCHEDULABLE).reason == Reason.LINK_DOWN
    assert result.blocking() == ()


def test_on_battery_is_schedulable_only_for_jobs_that_allow_unplugged_cars() -> None:
    result = evaluate(owner(require_plugged_in=False), reading(plugged_in=False), now=MON_NOON)

    schedulable = result.condition(ConditionType.SCHEDULABLE)
    assert result.schedulable
    assert schedulable.reason == Reason.ON_BATTERY
    assert f"{tk.UNPLUGGED}={tk.UNPLUGGED_ON_BATTERY}" in schedulable.message
    assert result.blocking() == ()


# --- no telemetry -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "fields"),
    [
        pytest.param(tk.DRIVING, {"drive_state": "Driving"}, id="driving"),
        pytest.param(tk.BATTERY_LOW, {"state_of_charge": 0.49}, id="battery-low"),
        pytest.param(tk.BATTERY_CRITICAL, {"state_of_charge": 0.3}, id="battery-critical"),
        pytest.param(tk.THERMAL, {"battery_temperature_c": 45.0}, id="thermal"),
        pytest.param(tk.OVERHEAT, {"compute_temperature_c": 99.0}, id="overheat"),
        pytest.param(tk.UNPLUGGED, {"plugged_in": False}, id="unplugged"),
    ],
)
def test_without_telemetry_the_taints_from_the_last_readings_are_kept(
    key: str, fields: dict[str, Any]
) -> None:
    policy = owner()
    previous = evaluate(policy, reading(**fields), now=MON_NOON)

    result = evaluate(policy, None, now=MON_NOON, previous=previous)

    assert key in result.taint_keys()
    assert result.taints == previous.taints
    assert result.labels == previous.labels
    for type_ in (ConditionType.PARKED, ConditionType.BATTERY_OK, ConditionType.THERMAL_OK):
        condition = result.condition(type_)
        assert (condition.status, condition.reason) == ("Unknown", Reason.NO_TELEMETRY)
    assert key in " ".join(c.message for c in result.conditions)
    assert not result.schedulable


def test_without_telemetry_policy_taints_are_computed_fresh() -> None:
    before = evaluate(
        owner(availability=[NIGHT_MON]),
        reading(energy_today_kwh=9.0, energy_day="2025-06-02", plugged_in=False),
        now=MON_NOON,
        trusted=False,
    )
    assert {tk.OFF_HOURS, tk.ENERGY_CAP, tk.UNTRUSTED} <= before.taint_keys()

    # The owner has since opened the hours and stopped requiring the plug; the operator trusts the car again.
    after = evaluate(owner(require_plugged_in=False), None, now=MON_NOON, previous=before)

    assert after.taint_keys() == {tk.UNPLUGGED}
    assert after.taints[0].value == tk.UNPLUGGED_ON_BATTERY


def test_without_telemetry_or_memory_the_car_is_not_schedulable_and_the_owner_rules_cannot_be_checked() -> (
    None
):
    result = evaluate(owner(), None, now=MON_NOON)

    assert result.taints == ()
    assert dict(result.labels) == {}
    schedulable = result.condition(ConditionType.SCHEDULABLE)
    assert (schedulable.status, schedulable.reason) == ("False", Reason.NO_TELEMETRY)
    assert result.blocking() == (Reason.NO_TELEMETRY,)


# --- observed (restart) -------------------------------------------------------------------------------------


def test_observed_rebuilds_the_hysteresis_memory_from_a_nodes_taints_and_labels() -> None:
    policy = owner()
    first = evaluate(
        policy,
        reading(state_of_charge=0.44, battery_temperature_c=51.0, plugged_in=False, drive_state="Driving"),
        now=MON_NOON,
        trusted=False,
    )
    node_taints = [(t.key, t.value, t.effect) for t in first.taints] + [
        (tk.VEHICLE, "true", "NoSchedule"),
        ("node.kubernetes.io/unreachable", None, "NoExecute"),
        ("example.com/dedicated", "gpu", "NoSchedule"),
    ]
    node_labels = dict(first.labels) | {tk.LABEL_ACCELERATOR: "hw4", tk.LABEL_REGION: "eu-west"}

    observed = CarPolicy.observed(node_taints, node_labels)

    assert observed.taints == first.taints
    assert dict(observed.labels) == dict(first.labels)
    assert [c.type for c in observed.conditions] == [c.value for c in ConditionType]
    # In every hysteresis band at once, the rebuilt memory decides exactly like the real one.
    held = reading(state_of_charge=0.465, battery_temperature_c=47.5, plugged_in=True)
    from_memory = evaluate(policy, held, now=MON_NOON, previous=first)
    from_node = evaluate(policy, held, now=MON_NOON, previous=observed)
    assert from_node.taints == from_memory.taints
    assert {tk.BATTERY_CRITICAL, tk.BATTERY_LOW, tk.OVERHEAT, tk.THERMAL} == from_node.taint_keys()
    assert dict(from_node.labels) == dict(from_memory.labels)


# --- blocking and must_drain --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rules", "fields", "kwargs", "blocking", "must_drain"),
    [
        pytest.param({}, {}, {}, (), (), id="healthy"),
        pytest.param({}, {"drive_state": "Driving"}, {}, ("Driving",), (), id="driving"),
        pytest.param({}, {"drive_state": "Preparing"}, {}, ("PreparingToDrive",), (), id="preparing"),
        pytest.param(
            {}, {"drive_state": "Unknown"}, {}, ("DriveStateUnknown",), (), id="drive-state-unknown"
        ),
        pytest.param(
            {}, {"state_of_charge": 0.3}, {}, ("ChargeCritical", "ChargeBelowFloor"), (), id="critical"
        ),
        pytest.param({}, {"state_of_charge": 0.49}, {}, ("ChargeBelowFloor",), (), id="low"),
        pytest.param(
            {},
            {"battery_temperature_c": 55.0},
            {},
            ("TemperatureAboveHardLimit", "TemperatureAboveSoftLimit"),
            (),
            id="overheat",
        ),
        pytest.param(
            {}, {"compute_temperature_c": 85.0}, {}, ("TemperatureAboveSoftLimit",), (), id="thermal"
        ),
        pytest.param({}, {"plugged_in": False}, {}, ("Unplugged",), (), id="unplugged-owner-requires-plug"),
        pytest.param(
            {"require_plugged_in": False}, {"plugged_in": False}, {}, (), (), id="on-battery-allowed"
        ),
        pytest.param({}, {}, {"paused": True}, ("PausedByOwner",), ("PausedByOwner",), id="paused"),
        pytest.param(
            {"availability": [NIGHT_MON]},
            {},
            {},
            ("OutsideAvailabilityWindow",),
            ("OutsideAvailabilityWindow",),
            id="off-hours",
        ),
        pytest.param(
            {},
            {"energy_today_kwh": 5.0, "energy_day": "2025-06-02"},
            {},
            ("DailyEnergyCapReached",),
            ("DailyEnergyCapReached",),
            id="energy-cap",
        ),
        pytest.param({}, {}, {"trusted": False}, (), (), id="untrusted-is-the-operators-concern"),
        pytest.param({}, {}, {"connected": False}, (), (), id="link-down-is-not-an-owner-rule"),
        pytest.param(
            {"availability": [NIGHT_MON]},
            {"energy_today_kwh": 5.0, "energy_day": "2025-06-02", "drive_state": "Driving"},
            {"paused": True},
            ("Driving", "PausedByOwner", "OutsideAvailabilityWindow", "DailyEnergyCapReached"),
            ("PausedByOwner", "OutsideAvailabilityWindow", "DailyEnergyCapReached"),
            id="everything-at-once-in-priority-order",
        ),
    ],
)
def test_blocking_lists_owner_rules_and_must_drain_lists_graceful_stops(
    rules: dict[str, Any],
    fields: dict[str, Any],
    kwargs: dict[str, Any],
    blocking: tuple[str, ...],
    must_drain: tuple[str, ...],
) -> None:
    result = evaluate(owner(**rules), reading(**fields), now=MON_NOON, **kwargs)

    assert result.blocking() == blocking
    assert result.must_drain() == must_drain
    assert all(type(r) is str for r in result.blocking() + result.must_drain())


# --- Schedulable and the messages ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rules", "fields", "kwargs", "reason"),
    [
        pytest.param(
            {}, {"drive_state": "Driving"}, {"connected": False}, "LinkDown", id="link-over-driving"
        ),
        pytest.param(
            {}, {"drive_state": "Driving", "state_of_charge": 0.3}, {}, "Driving", id="driving-over-critical"
        ),
        pytest.param(
            {},
            {"state_of_charge": 0.3, "battery_temperature_c": 55},
            {},
            "ChargeCritical",
            id="critical-over-overheat",
        ),
        pytest.param(
            {},
            {"battery_temperature_c": 55},
            {"paused": True},
            "TemperatureAboveHardLimit",
            id="overheat-over-paused",
        ),
        pytest.param(
            {"availability": [NIGHT_MON]}, {}, {"paused": True}, "PausedByOwner", id="paused-over-off-hours"
        ),
        pytest.param(
            {"availability": [NIGHT_MON]},
            {"energy_today_kwh": 9.0, "energy_day": "2025-06-02"},
            {},
            "OutsideAvailabilityWindow",
            id="off-hours-over-energy-cap",
        ),
        pytest.param(
            {},
            {"energy_today_kwh": 9.0, "energy_day": "2025-06-02", "state_of_charge": 0.49},
            {},
            "DailyEnergyCapReached",
            id="energy-cap-over-low",
        ),
        pytest.param(
            {},
            {"state_of_charge": 0.49, "compute_temperature_c": 85},
            {},
            "ChargeBelowFloor",
            id="low-over-thermal",
        ),
        pytest.param(
            {},
            {"compute_temperature_c": 85, "plugged_in": False},
            {},
            "TemperatureAboveSoftLimit",
            id="thermal-over-plug",
        ),
        pytest.param(
            {}, {"plugged_in": False}, {"trusted": False}, "Unplugged", id="unplugged-over-untrusted"
        ),
        pytest.param({}, {}, {"trusted": False}, "ResultsFailedVerification", id="untrusted"),
    ],
)
def test_schedulable_reports_the_most_important_blocker(
    rules: dict[str, Any], fields: dict[str, Any], kwargs: dict[str, Any], reason: str
) -> None:
    result = evaluate(owner(**rules), reading(**fields), now=MON_NOON, **kwargs)

    schedulable = result.condition(ConditionType.SCHEDULABLE)
    assert (schedulable.status, schedulable.reason) == ("False", reason)


def test_schedulable_message_lists_every_blocker_in_words() -> None:
    result = evaluate(
        owner(timezone="Europe/Berlin", availability=[NIGHT_MON]),
        reading(
            drive_state="Preparing",
            state_of_charge=0.49,
            compute_temperature_c=85.0,
            plugged_in=False,
            energy_today_kwh=5.25,
            energy_day="2025-06-02",
        ),
        now=MON_NOON,
        connected=False,
        paused=True,
        trusted=False,
    )

    message = result.condition(ConditionType.SCHEDULABLE).message
    for words in (
        "link to the car is down",
        "preparing to drive",
        "the owner paused the car",
        "outside the owner's availability windows",
        "5.25 kWh reached the owner's cap of 5 kWh",
        "state of charge 49 % is under the owner's floor of 50 %",
        "compute 85 °C is over the owner's soft limit of 80 °C",
        "unplugged and the owner lends it only while plugged in",
        "failed verification",
    ):
        assert words in message


@pytest.mark.parametrize(
    ("rules", "fields", "now", "type_", "status", "reason", "parts"),
    [
        pytest.param(
            {"critical_margin": 0.1},
            {"state_of_charge": 0.42},
            MON_NOON,
            ConditionType.BATTERY_OK,
            "False",
            "ChargeBelowFloor",
            ["state of charge 42 % is under the owner's floor of 50 %; new work resumes at 52 %"],
            id="battery-low",
        ),
        pytest.param(
            {},
            {"state_of_charge": 0.3},
            MON_NOON,
            ConditionType.BATTERY_OK,
            "False",
            "ChargeCritical",
            ["30 %", "stop floor of 45 %", "47 %", "52 %"],
            id="battery-critical",
        ),
        pytest.param(
            {},
            {"state_of_charge": 0.805},
            MON_NOON,
            ConditionType.BATTERY_OK,
            "True",
            "ChargeAboveFloor",
            ["80.5 %", "50 %"],
            id="battery-ok",
        ),
        pytest.param(
            {},
            {"battery_temperature_c": 43.5},
            MON_NOON,
            ConditionType.THERMAL_OK,
            "False",
            "TemperatureAboveSoftLimit",
            ["battery 43.5 °C is over the owner's soft limit of 40 °C", "38 °C", "78 °C"],
            id="thermal",
        ),
        pytest.param(
            {},
            {"compute_temperature_c": 97.0},
            MON_NOON,
            ConditionType.THERMAL_OK,
            "False",
            "TemperatureAboveHardLimit",
            ["compute 97 °C is over the hard limit of 95 °C", "47 °C", "92 °C"],
            id="overheat",
        ),
        pytest.param(
            {},
            {"drive_state": "Driving"},
            MON_NOON,
            ConditionType.PARKED,
            "False",
            "Driving",
            ["the car is driving"],
            id="driving",
        ),
        pytest.param(
            {"timezone": "Europe/Berlin", "availability": [NIGHT_MON]},
            {},
            MON_NOON,
            ConditionType.WITHIN_SCHEDULE,
            "False",
            "OutsideAvailabilityWindow",
            ["Europe/Berlin", "local time Mon 2025-06-02 14:00 CEST", "opens Mon 2025-06-02 22:00 CEST"],
            id="outside-window",
        ),
        pytest.param(
            {"timezone": "Europe/Berlin", "availability": [NIGHT_MON]},
            {},
            utc("2025-06-02T21:00"),
            ConditionType.WITHIN_SCHEDULE,
            "True",
            "InsideAvailabilityWindow",
            ["Europe/Berlin", "closes Tue 2025-06-03 06:00 CEST"],
            id="inside-window",
        ),
        pytest.param(
            {"max_energy_per_day_kwh": 5.0},
            {"energy_today_kwh": 5.25, "energy_day": "2025-06-02"},
            MON_NOON,
            ConditionType.SCHEDULABLE,
            "False",
            "DailyEnergyCapReached",
            ["5.25 kWh", "cap of 5 kWh", "2025-06-02", "Tue 2025-06-03 00:00 UTC"],
            id="energy-cap",
        ),
    ],
)
def test_conditions_carry_a_reason_and_a_message_with_the_numbers(
    rules: dict[str, Any],
    fields: dict[str, Any],
    now: datetime,
    type_: str,
    status: str,
    reason: str,
    parts: list[str],
) -> None:
    condition = evaluate(owner(**rules), reading(**fields), now=now).condition(type_)

    assert (condition.status, condition.reason) == (status, reason)
    for part in parts:
        assert part in condition.message


def test_a_latched_battery_low_says_where_new_work_resumes() -> None:
    _, held = replay(owner(), [{"state_of_charge": 0.49}, {"state_of_charge": 0.51}])

    battery = held.condition(ConditionType.BATTERY_OK)
    assert (battery.status, battery.reason) == ("False", Reason.CHARGE_LOW)
    assert (
        battery.message
        == "state of charge 51 % is back at the owner's floor of 50 % but new work resumes only at 52 %"
    )


@pytest.mark.parametrize(
    "result",
    [
        pytest.param(evaluate(owner(), reading(), now=MON_NOON), id="healthy"),
        pytest.param(evaluate(owner(), None, now=MON_NOON, connected=False), id="no-telemetry-link-down"),
        pytest.param(CarPolicy.observed([], {}), id="observed"),
    ],
)
def test_all_six_conditions_are_always_there_in_condition_type_order(result: CarPolicy) -> None:
    assert [c.type for c in result.conditions] == [c.value for c in ConditionType]
    assert all(type(c.type) is str and type(c.reason) is str for c in result.conditions)


def test_a_naive_now_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        evaluate(owner(), reading(), now=datetime(2025, 6, 2, 12, 0))
