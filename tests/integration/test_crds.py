"""Against the real API server: the generated CRDs install and become Established, valid objects are stored and
shown with their printer columns, and invalid ones are refused at admission with a message naming the field."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import yaml

from tests.conftest import DELETE, EXAMPLES, fleetjob_body, vehiclenode_body, with_field
from tests.integration.conftest import Cluster

pytestmark = pytest.mark.integration


def _apply(cluster: Cluster, body: dict[str, Any], check: bool = True) -> Any:
    return cluster.kubectl("apply", "-f", "-", input=json.dumps(body), check=check)


def test_crds_are_established(crds_installed: Cluster) -> None:
    out = crds_installed.kubectl("get", "crd", "-o", "json").stdout
    crds = {c["metadata"]["name"]: c for c in json.loads(out)["items"]}
    for name in ("vehiclenodes.fleetlet.io", "fleetjobs.fleetlet.io"):
        conds = {c["type"]: c["status"] for c in crds[name]["status"]["conditions"]}
        assert conds["Established"] == "True" and conds["NamesAccepted"] == "True"


def test_examples_apply_and_read_back_with_defaults(crds_installed: Cluster) -> None:
    crds_installed.kubectl("apply", "-f", str(EXAMPLES))
    car = json.loads(crds_installed.kubectl("get", "vehiclenode", "car-0002", "-o", "json").stdout)
    # Defaults come from the generated schema, applied by the API server itself.
    assert car["spec"]["policy"]["minStateOfCharge"] == 0.5
    assert car["spec"]["policy"]["requirePluggedIn"] is True
    assert car["spec"]["paused"] is False
    job = json.loads(crds_installed.kubectl("get", "fleetjob", "digits", "-n", "default", "-o", "json").stdout)
    assert job["spec"]["verification"] == {"replicas": 2, "quorum": 2, "spotCheckRate": 0.0, "tolerance": 0.0001}
    assert job["spec"]["model"]["runtime"] == "onnx"


def test_kubectl_get_shows_printer_columns_and_short_names(crds_installed: Cluster) -> None:
    crds_installed.kubectl("apply", "-f", str(EXAMPLES))
    status = {
        "telemetry": {
            "stateOfCharge": 0.81, "pluggedIn": True, "charging": False, "driveState": "Parked",
            "batteryTemperatureC": 21.5, "computeTemperatureC": 35.0, "linkQuality": 0.9,
            "observedAt": "2026-11-23T10:00:00Z",
        },
        "conditions": [{
            "type": "Schedulable", "status": "True", "reason": "ReadyForWork", "message": "",
            "lastTransitionTime": "2026-11-23T10:00:00Z",
        }],
    }
    crds_installed.kubectl(
        "patch", "vehiclenode", "car-0001", "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": status}),
    )
    rows = _table(crds_installed.kubectl("get", "vn").stdout)
    assert list(rows[0]) == ["NAME", "REGION", "SOC", "PLUGGED", "DRIVE", "CONNECTED", "SCHEDULABLE", "AGE"]
    car = next(r for r in rows if r["NAME"] == "car-0001")
    assert (car["REGION"], car["SOC"], car["PLUGGED"], car["DRIVE"]) == ("eu-west", "0.81", "true", "Parked")
    assert car["CONNECTED"] == "" and car["SCHEDULABLE"] == "True"  # no Connected condition yet: blank
    wide = _table(crds_installed.kubectl("get", "vn", "-o", "wide").stdout)
    assert next(r for r in wide if r["NAME"] == "car-0001")["REASON"] == "ReadyForWork"
    jobs = crds_installed.kubectl("get", "fj", "-A").stdout
    assert jobs.splitlines()[0].split()[:4] == ["NAMESPACE", "NAME", "PHASE", "SHARDS"]
    assert any(line.split()[1] == "digits" for line in jobs.splitlines()[1:])
    assert "digits" in crds_installed.kubectl("get", "fleetlet", "-A").stdout  # the category


def _table(text: str) -> list[dict[str, str]]:
    """kubectl's table as dicts, cut at the header's column offsets (blank cells stay blank)."""
    lines = text.splitlines()
    header = lines[0]
    starts = [i for i, ch in enumerate(header) if ch != " " and (i == 0 or header[i - 1] == " ")]
    names = header.split()
    bounds = list(zip(starts, [*starts[1:], None], strict=True))
    return [{n: line[a:b].strip() for n, (a, b) in zip(names, bounds, strict=True)} for line in lines[1:]]


# (what is wrong, body, words the API server's message must contain)
REJECTED = [
    ("negative shard size", with_field(fleetjob_body("bad-1"), "spec.shardSize", -5), "spec.shardSize"),
    ("parallelism 0", with_field(fleetjob_body("bad-2"), "spec.parallelism", 0), "spec.parallelism"),
    ("quorum above replicas", with_field(fleetjob_body("bad-3"), "spec.verification", {"replicas": 2, "quorum": 3}),
     "quorum must not exceed replicas"),
    ("unknown runtime", with_field(fleetjob_body("bad-4"), "spec.model.runtime", "docker"), "spec.model.runtime"),
    ("malformed sha256", with_field(fleetjob_body("bad-5"), "spec.model.sha256", "xyz"), "spec.model.sha256"),
    ("missing model", with_field(fleetjob_body("bad-6"), "spec.model", DELETE), "spec.model"),
    ("zero items", with_field(fleetjob_body("bad-7"), "spec.input.items", 0), "spec.input.items"),
    ("accelerator without types", with_field(fleetjob_body("bad-8"), "spec.resources", {"accelerator": 1}),
     "placement.acceleratorTypes must name at least one type"),
    ("state of charge above 1", with_field(vehiclenode_body("bad-car-1"), "spec.policy", {"minStateOfCharge": 1.5}),
     "spec.policy.minStateOfCharge"),
    ("temperature out of range",
     with_field(vehiclenode_body("bad-car-2"), "spec.policy", {"maxBatteryTemperatureC": 200}),
     "spec.policy.maxBatteryTemperatureC"),
    ("hard limit below soft limit",
     with_field(vehiclenode_body("bad-car-3"), "spec.policy", {"maxComputeTemperatureC": 90,
                                                          "hardMaxComputeTemperatureC": 85}),
     "hardMaxComputeTemperatureC must be above maxComputeTemperatureC"),
    ("a VIN as vehicle id", with_field(vehiclenode_body("bad-car-4"), "spec.vehicleId", "5yjsa1e26hf000337"),
     "not a VIN"),
    ("negative battery capacity",
     with_field(vehiclenode_body("bad-car-5"), "spec.hardware.batteryCapacityKWh", -1), "batteryCapacityKWh"),
    ("malformed availability window",
     with_field(vehiclenode_body("bad-car-6"), "spec.policy", {"availability": [{"start": "7am", "end": "09:00"}]}),
     "spec.policy.availability[0].start"),
]


@pytest.mark.parametrize(("what", "body", "needle"), REJECTED, ids=[r[0] for r in REJECTED])
def test_invalid_object_is_refused_at_admission(crds_installed: Cluster, what: str, body: dict[str, Any],
                                                needle: str) -> None:
    proc = _apply(crds_installed, body, check=False)
    assert proc.returncode != 0, f"{what}: the API server accepted it"
    assert needle in proc.stderr, f"{what}: message does not name the field:\n{proc.stderr}"
    kind = body["kind"].lower()
    ns = ["-n", body["metadata"]["namespace"]] if "namespace" in body["metadata"] else []
    gone = crds_installed.kubectl("get", kind, body["metadata"]["name"], *ns, check=False)
    assert gone.returncode != 0 and "NotFound" in gone.stderr


def test_unknown_fields_are_refused_by_strict_validation(crds_installed: Cluster) -> None:
    body = with_field(fleetjob_body("bad-unknown"), "spec.shardSiz", 10)
    proc = crds_installed.kubectl("apply", "--validate=strict", "-f", "-", input=json.dumps(body), check=False)
    assert proc.returncode != 0
    assert 'unknown field "spec.shardSiz"' in proc.stderr


def test_status_is_a_subresource(crds_installed: Cluster) -> None:
    crds_installed.kubectl("apply", "-f", "-", input=yaml.safe_dump(fleetjob_body("status-probe")))
    # A user's spec update cannot write status: the main resource ignores it.
    patched = with_field(fleetjob_body("status-probe"), "status", {"phase": "Succeeded"})
    crds_installed.kubectl("apply", "-f", "-", input=json.dumps(patched))
    got = json.loads(crds_installed.kubectl("get", "fj", "status-probe", "-o", "json").stdout)
    assert "status" not in got or got["status"].get("phase") != "Succeeded"
    # Invalid status is refused on the subresource too.
    bad = crds_installed.kubectl(
        "patch", "fj", "status-probe", "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": {"phase": "Exploded"}}), check=False,
    )
    assert bad.returncode != 0 and "status.phase" in bad.stderr


def test_a_fleetjobs_planned_fields_cannot_change_but_its_knobs_can(crds_installed: Cluster) -> None:
    body = fleetjob_body("immutable-probe")
    _apply(crds_installed, body)
    for path, value in (("spec.input", {"uri": "fleetlet://artifacts/other.npy", "items": 1000}),
                        ("spec.shardSize", 7), ("spec.verification", {"replicas": 2, "quorum": 2}),
                        ("spec.output", {"uri": "fleetlet://results/x"})):
        proc = _apply(crds_installed, with_field(copy.deepcopy(body), path, value), check=False)
        assert proc.returncode != 0, f"{path} changed under an existing FleetJob"
        assert "cannot change once a FleetJob exists" in proc.stderr, proc.stderr
    # The knobs a user turns while a job runs.
    knobs = with_field(with_field(body, "spec.parallelism", 3), "spec.suspend", True)
    _apply(crds_installed, with_field(knobs, "spec.deadlineSeconds", 600))
    got = json.loads(crds_installed.kubectl("get", "fj", "immutable-probe", "-o", "json").stdout)["spec"]
    assert (got["parallelism"], got["suspend"], got["deadlineSeconds"], got["shardSize"]) == (3, True, 600, 256)


@pytest.fixture(scope="module", autouse=True)
def _cleanup(crds_installed: Cluster) -> Any:
    """Leave nothing behind for the suites that run after this one on the same control plane (the examples apply
    a FleetJob named ``digits`` in ``default``, and VehicleNodes)."""
    yield
    crds_installed.kubectl("delete", "-f", str(EXAMPLES), "--ignore-not-found", "--wait=false", check=False)
    crds_installed.kubectl("delete", "fleetjobs", "--all", "-n", "default", "--wait=false", check=False)
