"""The v1alpha1 models accept what users write, fill the documented defaults, and refuse bad input with
a message that names the field — the same answers the API server gives from the generated CRDs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from fleetlet.api.v1alpha1 import FleetJob, VehicleNode, get_condition, set_condition
from fleetlet.api.v1alpha1 import taints as t
from tests.conftest import DELETE, EXAMPLES, fleetjob_body, vehiclenode_body, with_field


def test_examples_are_valid_objects() -> None:
    docs = [d for f in sorted(EXAMPLES.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
    kinds = {d["kind"] for d in docs}
    assert kinds == {"VehicleNode", "FleetJob"}
    for doc in docs:
        model = VehicleNode if doc["kind"] == "VehicleNode" else FleetJob
        obj = model.model_validate(doc)
        assert obj.metadata.name == doc["metadata"]["name"]


def test_vehiclenode_defaults_protect_the_owner() -> None:
    vn = VehicleNode.model_validate(vehiclenode_body())
    policy = vn.spec.policy
    assert policy.require_plugged_in is True
    assert policy.min_state_of_charge == 0.5
    assert policy.stop_state_of_charge == pytest.approx(0.45)
    assert vn.spec.paused is False
    wire = vn.wire()
    assert wire["spec"]["hardware"]["batteryCapacityKWh"] == 75.0
    assert wire["spec"]["policy"]["maxEnergyPerDayKWh"] == 5.0


def test_fleetjob_defaults() -> None:
    job = FleetJob.model_validate(fleetjob_body())
    assert job.spec.model.runtime == "onnx"
    assert job.spec.verification.replicas == 1 and job.spec.verification.quorum == 1
    assert job.spec.retries == 3
    assert job.wire()["spec"]["shardSize"] == 256


INVALID_FLEETJOBS = [
    ("spec.shardSize", -5, "shardSize"),
    ("spec.parallelism", 0, "parallelism"),
    ("spec.verification", {"replicas": 2, "quorum": 3}, "quorum must not exceed replicas"),
    ("spec.model.runtime", "docker", "runtime"),
    ("spec.model.sha256", "not-a-digest", "sha256"),
    ("spec.model", DELETE, "model"),
    ("spec.input.items", 0, "items"),
    ("spec.model.uri", "ftp://example/x", "uri"),
    ("spec.resources", {"accelerator": 1}, "acceleratorTypes"),
    ("spec.retries", 1000, "retries"),
    ("spec.unknownField", 1, "unknownField"),
]


@pytest.mark.parametrize(("path", "value", "needle"), INVALID_FLEETJOBS, ids=[c[0] for c in INVALID_FLEETJOBS])
def test_invalid_fleetjob_is_refused_naming_the_field(path: str, value: Any, needle: str) -> None:
    with pytest.raises(ValidationError) as err:
        FleetJob.model_validate(with_field(fleetjob_body(), path, value))
    assert needle in str(err.value)


INVALID_VEHICLENODES = [
    ("spec.policy.minStateOfCharge", 1.5, "minStateOfCharge"),
    ("spec.policy.maxBatteryTemperatureC", 200, "maxBatteryTemperatureC"),
    ("spec.policy.hardMaxBatteryTemperatureC", 35, "hardMaxBatteryTemperatureC must be above"),
    ("spec.hardware.batteryCapacityKWh", 0, "batteryCapacityKWh"),
    ("spec.hardware.cpu", "lots", "cpu"),
    ("spec.vehicleId", "5yjsa1e26hf000337", "not a VIN"),
    ("spec.policy.availability", [{"start": "25:00", "end": "06:00"}], "start"),
    ("spec.policy.availability", [{"start": "06:00", "end": "06:00"}], "start and end must differ"),
]


@pytest.mark.parametrize(
    ("path", "value", "needle"), INVALID_VEHICLENODES, ids=[f"{c[0]}={c[1]}" for c in INVALID_VEHICLENODES]
)
def test_invalid_vehiclenode_is_refused_naming_the_field(path: str, value: Any, needle: str) -> None:
    with pytest.raises(ValidationError) as err:
        VehicleNode.model_validate(with_field(vehiclenode_body(), path, value))
    assert needle in str(err.value)


def test_condition_transition_time_moves_only_on_a_flip() -> None:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    t1 = t0 + timedelta(minutes=5)
    conds = set_condition([], "Parked", "True", "Parked", "parked at home", t0, 3)
    conds = set_condition(conds, "Parked", "True", "Parked", "still parked", t1, 4)
    parked = get_condition(conds, "Parked")
    assert parked is not None
    assert parked.last_transition_time == t0 and parked.message == "still parked"
    assert parked.observed_generation == 4
    conds = set_condition(conds, "Parked", "False", "Driving", "driving", t1, 4)
    parked = get_condition(conds, "Parked")
    assert parked is not None and parked.last_transition_time == t1 and parked.reason == "Driving"
    assert len(conds) == 1


def test_condition_reason_must_be_camel_case() -> None:
    with pytest.raises(ValidationError, match="reason"):
        set_condition([], "Parked", "True", "not camel case", "", datetime.now(UTC))


def test_every_taint_key_has_the_documented_effect() -> None:
    assert t.TAINT_EFFECTS[t.VEHICLE] == "NoSchedule"
    no_execute = {k for k, e in t.TAINT_EFFECTS.items() if e == "NoExecute"}
    assert no_execute == {t.DRIVING, t.BATTERY_CRITICAL, t.OVERHEAT}
    assert all(k.startswith("fleetlet.io/") for k in t.TAINT_EFFECTS)
