"""The shim's pure logic: which pods a car accepts, how a car's report becomes pod status, the Node it
registers, how replicas split the fleet, and how log lines survive resends."""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import pytest
from fleetlet_shim import node as nodes
from fleetlet_shim import podstatus, sharding
from fleetlet_shim.shim import PodLogs

from fleetlet.api.v1alpha1 import VehicleNode
from fleetlet.api.v1alpha1.shard import ANNOTATION, ShardAssignment
from fleetlet.carlink.protocol import Checkpoint, ContainerState, PodStatus
from tests.conftest import vehiclenode_body

DIGEST_A, DIGEST_B = "a" * 64, "b" * 64


def _pod(runtime_class: str | None = "fleetlet-onnx", annotation: Any = "default",
         requests: dict[str, str] | None = None) -> dict[str, Any]:
    if annotation == "default":
        annotation = ShardAssignment.model_validate(
            {"model": {"sha256": DIGEST_A}, "input": {"sha256": DIGEST_B, "end": 100}}
        ).annotation()
    meta: dict[str, Any] = {"name": "job-0", "namespace": "ml", "uid": "u1", "annotations": {}}
    if annotation is not None:
        meta["annotations"][ANNOTATION] = annotation
    spec: dict[str, Any] = {"nodeName": "car-1", "containers": [{"name": "shard", "image": "fleetlet.io/onnx",
                                                               "resources": {"requests": requests or {}}}]}
    if runtime_class:
        spec["runtimeClassName"] = runtime_class
    return {"metadata": meta, "spec": spec}


CAPACITY = {"cpu": "4", "memory": "8Gi"}


def test_a_well_formed_shard_pod_is_admitted() -> None:
    assignment = podstatus.admit(_pod(requests={"cpu": "2", "memory": "1Gi"}), ["onnx"], CAPACITY)
    assert assignment.model.sha256 == DIGEST_A and assignment.input.end == 100


@pytest.mark.parametrize(
    ("pod", "runtimes", "reason", "words"),
    [
        (_pod(runtime_class=None), ["onnx"], "UnsupportedRuntime", "cannot run on a car"),
        (_pod(runtime_class="runc"), ["onnx"], "UnsupportedRuntime", "'runc'"),
        (_pod(), [], "UnsupportedRuntime", "does not offer"),
        (_pod(annotation=None), ["onnx"], "InvalidAssignment", "no fleetlet.io/assignment"),
        (_pod(annotation="{not json"), ["onnx"], "InvalidAssignment", "is invalid"),
        (_pod(annotation=json.dumps({"model": {"sha256": "x"}, "input": {"sha256": DIGEST_B, "end": 1}})),
         ["onnx"], "InvalidAssignment", "sha256"),
        (_pod(requests={"cpu": "6"}), ["onnx"], "OutOfcpu", "requests cpu 6"),
        (_pod(requests={"memory": "9Gi"}), ["onnx"], "OutOfmemory", "requests memory 9Gi"),
    ],
    ids=["no-runtime-class", "foreign-runtime-class", "car-lacks-runtime", "no-annotation", "bad-json",
         "bad-digest", "too-much-cpu", "too-much-memory"],
)
def test_a_pod_the_car_cannot_run_is_rejected_with_a_reason(pod: dict[str, Any], runtimes: list[str],
                                                           reason: str, words: str) -> None:
    with pytest.raises(podstatus.Rejection) as err:
        podstatus.admit(pod, runtimes, CAPACITY)
    assert err.value.reason == reason and words in err.value.message
    status = podstatus.rejected_status(err.value.reason, err.value.message)
    assert status["phase"] == "Failed" and status["reason"] == reason


def test_reports_become_kubernetes_pod_status() -> None:
    started = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)
    running = PodStatus(car="car-1", uid="u1", phase="Running", items_done=40,
                        container=ContainerState(state="running", started_at=started),
                        checkpoint=Checkpoint(digest=DIGEST_A, items_done=40))
    st = podstatus.status_from_report(_pod(), running, "10.1.2.3")
    assert st["phase"] == "Running" and st["hostIP"] == "10.1.2.3"
    cs = st["containerStatuses"][0]
    assert cs["name"] == "shard" and cs["ready"] and cs["state"]["running"]["startedAt"] == "2026-11-23T10:00:00Z"
    progress = next(c for c in st["conditions"] if c["type"] == podstatus.PROGRESS_CONDITION)
    assert f"checkpoint=sha256:{DIGEST_A}" in progress["message"] and "itemsDone=40" in progress["message"]

    done = PodStatus(car="car-1", uid="u1", phase="Succeeded", items_done=100, result_digest=DIGEST_B,
                     container=ContainerState(state="terminated", exit_code=0, started_at=started,
                                              finished_at=started))
    term = podstatus.status_from_report(_pod(), done, "10.1.2.3")["containerStatuses"][0]["state"]["terminated"]
    assert term["exitCode"] == 0 and term["reason"] == "Completed"
    assert json.loads(term["message"]) == {"itemsDone": 100, "resultSha256": DIGEST_B}

    stopped = PodStatus(car="car-1", uid="u1", phase="Failed", items_done=10,
                        container=ContainerState(state="terminated", exit_code=137, reason="CarLeftParked",
                                                 message="the car started driving"))
    st = podstatus.status_from_report(_pod(), stopped, "10.1.2.3")
    assert st["phase"] == "Failed" and st["reason"] == "CarLeftParked"
    assert st["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 137


def test_quantities() -> None:
    assert podstatus.quantity("500m") == 0.5
    assert podstatus.quantity("2Gi") == 2 * 2**30
    with pytest.raises(ValueError):
        podstatus.quantity("lots")


def test_the_registered_node_carries_the_vehicle_taint_capacity_and_owner() -> None:
    body = vehiclenode_body("car-7")
    body["metadata"]["uid"] = "vn-uid"
    body["spec"]["hardware"]["accelerators"] = [{"type": "hw4", "count": 2, "tops": 50}]
    vn = VehicleNode.model_validate(body)
    now = datetime(2026, 11, 23, tzinfo=UTC)
    status = nodes.node_status(vn, nodes.Endpoint("10.0.0.9", 10250), 4, True, "CarConnected", "", now)
    manifest = nodes.node_manifest(vn, nodes.hardware_labels(vn, "shim-0"), status)
    assert manifest["spec"]["taints"] == [{"key": "fleetlet.io/vehicle", "value": "true", "effect": "NoSchedule"}]
    assert manifest["metadata"]["ownerReferences"][0] == {
        "apiVersion": "fleetlet.io/v1alpha1", "kind": "VehicleNode", "name": "car-7", "uid": "vn-uid"}
    assert status["capacity"] == {"cpu": "4", "memory": "8Gi", "pods": "4", "ephemeral-storage": "16Gi",
                                  "fleetlet.io/accelerator": "2"}
    assert status["addresses"][0] == {"type": "InternalIP", "address": "10.0.0.9"}
    assert status["daemonEndpoints"] == {"kubeletEndpoint": {"Port": 10250}}
    labels = manifest["metadata"]["labels"]
    assert labels["fleetlet.io/accelerator"] == "hw4" and labels["topology.kubernetes.io/region"] == "eu-west"
    lease = nodes.lease_manifest("car-7", "node-uid", 40, now)
    assert lease["metadata"]["namespace"] == "kube-node-lease" and lease["spec"]["leaseDurationSeconds"] == 40
    assert lease["spec"]["renewTime"] == "2026-11-23T00:00:00.000000Z"


def test_replicas_split_the_fleet_without_overlap_or_gaps() -> None:
    cars = [f"car-{i:06d}" for i in range(3000)]
    owners = {car: [r for r in range(3) if sharding.owns(car, r, 3)] for car in cars}
    assert all(len(o) == 1 for o in owners.values())  # each car has exactly one replica
    counts = Counter(o[0] for o in owners.values())
    assert all(800 <= n <= 1200 for n in counts.values())  # roughly even
    moved = sum(1 for car in cars if sharding.owner(car, 3) != sharding.owner(car, 4))
    assert moved < len(cars) * 0.35  # growing 3 -> 4 replicas moves about a quarter, not everything
    assert all(sharding.owner(car, 1) == 0 for car in cars)


def test_log_lines_resent_after_a_reconnect_are_not_duplicated() -> None:
    logs = PodLogs(max_lines=5)
    logs.add("u1", 0, ["a", "b", "c"])
    logs.add("u1", 1, ["b", "c", "d"])  # the car resent from offset 1
    assert logs.get("u1") == ["a", "b", "c", "d"]
    logs.add("u1", 4, ["e", "f"])
    assert logs.get("u1") == ["b", "c", "d", "e", "f"]  # bounded
    logs.drop("u1")
    assert logs.get("u1") == []
