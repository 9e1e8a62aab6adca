"""The safety reflex stops work synchronously the instant a car leaves Parked or crosses a hard limit."""

from __future__ import annotations

import threading

import pytest
from fleetlet_car.reflex import Refusal, SafetyReflex, StopTrigger
from fleetlet_car.sim import SimulatedCar
from fleetlet_car.sim.vehicle import SimulatedVehicle
from fleetlet_car.vehicle import VehicleInterface

from fleetlet.api.v1alpha1.vehiclenode import Policy

POLICY = Policy(
    min_state_of_charge=0.5,
    critical_margin=0.05,
    hard_min_state_of_charge=0.2,
    require_plugged_in=False,
    max_battery_temperature_c=40.0,
    hard_max_battery_temperature_c=50.0,
    max_compute_temperature_c=80.0,
    hard_max_compute_temperature_c=95.0,
)


class Sandbox:
    """Stands in for a running sandbox: ``kill`` records that, and whether, it was stopped."""

    def __init__(self, car: SimulatedCar) -> None:
        self.car = car
        self.kills = 0
        self.state_seen_at_kill: str | None = None

    def kill(self) -> None:
        self.kills += 1
        self.state_seen_at_kill = self.car.drive_state


@pytest.fixture
def rig() -> tuple[SimulatedCar, SimulatedVehicle, SafetyReflex, Sandbox]:
    car = SimulatedCar.standalone(seed=1, initial_soc=0.8, initial_plugged_in=True, climate_mean_c=20.0,
                                  climate_amplitude_c=0.0, sun_exposure=0.0)  # fmt: skip
    vehicle = SimulatedVehicle(car)
    assert isinstance(vehicle, VehicleInterface)
    reflex = SafetyReflex(POLICY)
    reflex.attach(vehicle)
    sandbox = Sandbox(car)
    reflex.add_stop_callback(sandbox.kill)
    return car, vehicle, reflex, sandbox


def test_a_parked_car_in_its_limits_accepts_work(rig) -> None:
    _car, _v, reflex, sandbox = rig
    assert reflex.admit().allowed
    assert sandbox.kills == 0 and not reflex.tripped


@pytest.mark.parametrize("state", ["Preparing", "Driving", "Unknown"])
def test_leaving_parked_kills_work_before_the_state_change_returns(rig, state) -> None:
    car, _v, reflex, sandbox = rig
    car.set_drive_state(state)
    # The kill ran inside set_drive_state: by the time it returns the work is already stopped.
    assert sandbox.kills == 1 and sandbox.state_seen_at_kill == state
    trip = reflex.last_trip
    assert trip is not None and trip.triggers == {StopTrigger.NOT_PARKED}
    assert 0 < trip.changed_at_ns <= trip.stopped_at_ns and trip.callbacks == 1
    assert not reflex.admit().allowed and Refusal.NOT_PARKED in reflex.admit().reasons


def test_a_scheduled_departure_trips_the_reflex_during_the_step() -> None:
    fleet = SimulatedCar.standalone(seed=2, schedules=True).fleet  # a car with a real schedule
    vehicle = SimulatedVehicle(fleet.car(0))
    r = SafetyReflex(POLICY.model_copy(update={"hard_min_state_of_charge": 0.0, "min_state_of_charge": 0.05,
                                               "critical_margin": 0.05}))  # fmt: skip
    r.attach(vehicle)
    kills: list[str] = []
    r.add_stop_callback(lambda: kills.append(fleet.car(0).drive_state))
    for _ in range(7 * 24 * 60):
        if fleet.step(60.0):
            break
    assert kills and kills[0] != "Parked"


def test_hard_soc_floor_and_critical_margin_stop_work(rig) -> None:
    car, _v, reflex, sandbox = rig
    assert reflex.limits.stop_soc == pytest.approx(0.45)
    car.set_state_of_charge(0.46)
    assert sandbox.kills == 0
    car.set_state_of_charge(0.449)
    assert sandbox.kills == 1 and reflex.last_trip.triggers == {StopTrigger.CHARGE_BELOW_STOP_FLOOR}
    strict = SafetyReflex(POLICY.model_copy(update={"min_state_of_charge": 0.22, "critical_margin": 0.01}))
    assert strict.limits.stop_soc == pytest.approx(0.21)
    lax = SafetyReflex(POLICY.model_copy(update={"min_state_of_charge": 0.22, "critical_margin": 0.0,
                                                 "hard_min_state_of_charge": 0.22}))  # fmt: skip
    assert lax.limits.stop_soc == pytest.approx(0.22)


@pytest.mark.parametrize(
    ("battery_c", "compute_c", "trigger"),
    [(50.5, 30.0, StopTrigger.BATTERY_OVERHEAT), (25.0, 95.5, StopTrigger.COMPUTE_OVERHEAT)],
)
def test_hard_temperature_limits_stop_work(rig, battery_c, compute_c, trigger) -> None:
    car, _v, reflex, sandbox = rig
    car.set_temperatures(battery_c=49.9, compute_c=94.9)
    assert sandbox.kills == 0
    car.set_temperatures(battery_c=battery_c, compute_c=compute_c)
    assert sandbox.kills == 1 and trigger in reflex.last_trip.triggers


def test_work_is_refused_until_safe_with_hysteresis_on_charge(rig) -> None:
    car, _v, reflex, sandbox = rig
    car.set_state_of_charge(0.44)
    assert reflex.tripped
    car.set_state_of_charge(0.46)  # above the stop floor, but under the resume level
    assert reflex.tripped and not reflex.admit().allowed
    assert Refusal.CHARGE_LOW in reflex.admit().reasons
    car.set_state_of_charge(0.449)  # dipping again while already stopped does not re-fire
    assert sandbox.kills == 1
    car.set_state_of_charge(0.5)
    assert not reflex.tripped and reflex.admit().allowed


def test_work_is_refused_until_cool_with_hysteresis_on_temperature(rig) -> None:
    car, _v, reflex, _sandbox = rig
    car.set_temperatures(compute_c=96.0)
    car.set_temperatures(compute_c=90.0)  # under the hard limit, above the soft one
    assert not reflex.admit().allowed and Refusal.COMPUTE_WARM in reflex.admit().reasons
    car.set_temperatures(compute_c=79.0)
    assert reflex.admit().allowed
    car.set_temperatures(battery_c=51.0)
    car.set_temperatures(battery_c=45.0)
    assert not reflex.admit().allowed
    car.set_temperatures(battery_c=40.0)
    assert reflex.admit().allowed


def test_back_in_park_after_a_drive_accepts_work_again(rig) -> None:
    car, _v, reflex, sandbox = rig
    car.set_drive_state("Driving")
    car.step(60.0)
    assert not reflex.admit().allowed
    car.set_drive_state("Parked")
    assert reflex.admit().allowed and not reflex.tripped
    car.set_drive_state("Preparing")
    assert sandbox.kills == 2 and len(reflex.trips) == 2


def test_a_new_trigger_while_stopped_fires_again(rig) -> None:
    car, _v, reflex, sandbox = rig
    car.set_state_of_charge(0.3)
    car.set_drive_state("Driving")  # the owner drives off while work is held for low charge
    assert sandbox.kills == 2
    assert reflex.last_trip.triggers == {StopTrigger.CHARGE_BELOW_STOP_FLOOR, StopTrigger.NOT_PARKED}


def test_every_callback_runs_even_if_one_fails(rig) -> None:
    car, _v, reflex, sandbox = rig

    def broken() -> None:
        raise RuntimeError("sandbox already gone")

    reflex.add_stop_callback(broken)
    after: list[int] = []
    reflex.add_stop_callback(lambda: after.append(1))
    car.set_drive_state("Driving")
    assert sandbox.kills == 1 and after == [1]
    assert reflex.last_trip.callbacks == 3 and reflex.last_trip.failures == 1


def test_callback_registered_while_tripped_is_called_at_once_and_removal_works(rig) -> None:
    car, _v, reflex, sandbox = rig
    remove = reflex.add_stop_callback(sandbox.kill)
    remove()
    car.set_drive_state("Driving")
    assert sandbox.kills == 1
    late = Sandbox(car)
    reflex.add_stop_callback(late.kill)
    assert late.kills == 1  # work that slipped past admission is stopped right away


def test_no_state_no_work_and_owner_requiring_plug_stops_on_unplug() -> None:
    reflex = SafetyReflex(POLICY.model_copy(update={"require_plugged_in": True}))
    assert reflex.admit() == reflex.admit() and Refusal.NO_VEHICLE_STATE in reflex.admit().reasons
    car = SimulatedCar.standalone(seed=3, initial_soc=0.9, initial_plugged_in=True, climate_mean_c=20.0,
                                  climate_amplitude_c=0.0, sun_exposure=0.0)  # fmt: skip
    car.set_plugged_in(True, charger_w=7400.0)
    reflex.attach(SimulatedVehicle(car))
    kills: list[int] = []
    reflex.add_stop_callback(lambda: kills.append(1))
    assert reflex.admit().allowed
    car.set_plugged_in(False)
    assert kills == [1] and reflex.last_trip.triggers == {StopTrigger.UNPLUGGED}


def test_tightened_policy_is_enforced_at_once(rig) -> None:
    car, _v, reflex, sandbox = rig
    car.set_state_of_charge(0.6)
    reflex.set_policy(POLICY.model_copy(update={"min_state_of_charge": 0.7}))
    assert sandbox.kills == 1 and reflex.last_trip.triggers == {StopTrigger.CHARGE_BELOW_STOP_FLOOR}


def test_observe_from_another_thread_stops_work_before_it_returns(rig) -> None:
    car, vehicle, reflex, sandbox = rig
    t = threading.Thread(target=car.set_drive_state, args=("Driving",))
    t.start()
    t.join(timeout=5)
    assert sandbox.kills == 1 and reflex.tripped
