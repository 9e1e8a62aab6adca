"""The shim's pure logic: which pods a car accepts (through the one shard contract), how a car's report becomes
pod status, the Node it registers and the taints it writes, how replicas split the fleet, the RBAC it asks for,
the revocation list it reads, and how log lines survive resends."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import pytest
from fleetlet_shim import kube, podstatus, rbac, sharding
from fleetlet_shim import nodespec as nodes
from fleetlet_shim.link.credentials import parse_revocations
from fleetlet_shim.logs import PodLogs

from fleetlet.api.v1alpha1 import Telemetry, VehicleNode
from fleetlet.api.v1alpha1.shard import ANNOTATION, ShardAssignment, ShardReport
from fleetlet.api.v1alpha1.vehiclenode import Policy
from fleetlet.carlink.protocol import Checkpoint, ContainerState, PodStatus
from fleetlet.policy import evaluate
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


def test_a_well_formed_shard_pod_is_admitted_with_its_requests_as_the_assignments_resources() -> None:
    assignment = podstatus.admit(_pod(requests={"cpu": "2", "memory": "1Gi"}), ["onnx"], CAPACITY)
    assert assignment.model.sha256 == DIGEST_A and assignment.input.end == 100
    assert (assignment.resources.cpu, assignment.resources.memory) == ("2", "1Gi")
    assert assignment.resources.accelerator == 0 and assignment.resources.accelerator_type is None


def test_the_shard_contract_round_trips_through_a_pod_exactly() -> None:
    a = ShardAssignment.model_validate({
        "model": {"sha256": DIGEST_A}, "input": {"sha256": DIGEST_B, "format": "npz", "start": 10, "end": 300},
        "resumeFrom": {"sha256": DIGEST_B, "itemsDone": 50},
        "resources": {"cpu": "2", "memory": "3Gi", "accelerator": 1},
    })
    pod = a.apply_to_pod({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "shard"}]}})
    assert pod["spec"]["containers"][0]["resources"] == {
        "requests": {"cpu": "2", "memory": "3Gi", "fleetlet.io/accelerator": "1"},
        "limits": {"cpu": "2", "memory": "3Gi", "fleetlet.io/accelerator": "1"}}
    assert ShardAssignment.from_pod(pod) == a


def test_an_accelerator_pod_gets_the_cars_accelerator_type_or_is_rejected() -> None:
    pod = _pod(requests={"cpu": "1", "fleetlet.io/accelerator": "1"})
    got = podstatus.admit(pod, ["onnx"], {**CAPACITY, "fleetlet.io/accelerator": "2"}, "hw4")
    assert got.resources.accelerator == 1 and got.resources.accelerator_type == "hw4"
    with pytest.raises(podstatus.Rejection) as err:
        podstatus.admit(pod, ["onnx"], CAPACITY, None)
    assert err.value.reason == "OutOfaccelerator" and "has 0" in err.value.message


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
                        checkpoint=Checkpoint(sha256=DIGEST_A, items_done=40), provider="CPUExecutionProvider")
    st = podstatus.status_from_report(_pod(), running, "10.1.2.3")
    assert st["phase"] == "Running" and st["hostIP"] == "10.1.2.3"
    cs = st["containerStatuses"][0]
    assert cs["name"] == "shard" and cs["ready"] and cs["state"]["running"]["startedAt"] == "2026-11-23T10:00:00Z"
    progress = next(c for c in st["conditions"] if c["type"] == podstatus.PROGRESS_CONDITION)
    assert f"checkpoint=sha256:{DIGEST_A}" in progress["message"] and "itemsDone=40" in progress["message"]
    runtime = next(c for c in st["conditions"] if c["type"] == "fleetlet.io/Runtime")
    assert runtime["reason"] == "CPUExecutionProvider"  # the pod status says which provider ran it
    assert podstatus.latest_checkpoint({"status": st}) == (DIGEST_A, 40)

    done = PodStatus(car="car-1", uid="u1", phase="Succeeded", items_done=100, result_digest=DIGEST_B,
                     provider="CPUExecutionProvider", energy_kwh=0.002,
                     container=ContainerState(state="terminated", exit_code=0, started_at=started,
                                              finished_at=started))
    st = podstatus.status_from_report(_pod(), done, "10.1.2.3")
    term = st["containerStatuses"][0]["state"]["terminated"]
    assert term["exitCode"] == 0 and term["reason"] == "Completed"
    assert json.loads(term["message"]) == {"itemsDone": 100, "resultSha256": DIGEST_B,
                                           "provider": "CPUExecutionProvider", "energyKWh": 0.002}
    report = ShardReport.from_pod({"status": st})  # what the operator reads back
    assert report is not None and report.result_sha256 == DIGEST_B and report.energy_kwh == 0.002

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
    assert manifest["metadata"]["labels"]["fleetlet.io/owner"] == "owner-1"  # replicas spread across owners
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


def _telemetry(**kw: Any) -> Telemetry:
    base = {"stateOfCharge": 0.8, "pluggedIn": True, "driveState": "Parked", "batteryTemperatureC": 20.0,
            "computeTemperatureC": 30.0, "observedAt": "2026-11-23T10:00:00Z"}
    return Telemetry.model_validate({**base, **kw})


def test_a_new_node_is_born_with_the_taints_and_labels_its_first_telemetry_implies() -> None:
    vn = VehicleNode.model_validate(vehiclenode_body("car-8"))
    now = datetime(2026, 11, 23, 10, tzinfo=UTC)
    policy = evaluate(vn.spec.policy, _telemetry(driveState="Driving", stateOfCharge=0.42), now=now)
    status = nodes.node_status(vn, nodes.Endpoint("10.0.0.9", 10250), 4, True, "CarConnected", "", now)
    manifest = nodes.node_manifest(vn, nodes.hardware_labels(vn, "shim-0"), status, policy, now)
    keys = {(t["key"], t["effect"]) for t in manifest["spec"]["taints"]}
    assert keys == {("fleetlet.io/vehicle", "NoSchedule"), ("fleetlet.io/driving", "NoExecute"),
                    ("fleetlet.io/battery-low", "NoSchedule"), ("fleetlet.io/battery-critical", "NoExecute")}
    assert manifest["metadata"]["labels"]["fleetlet.io/soc-band"] == "4"


def test_the_ready_conditions_transition_time_moves_only_when_its_status_does() -> None:
    vn = VehicleNode.model_validate(vehiclenode_body("car-8"))
    t0, t1 = datetime(2026, 11, 23, 10, tzinfo=UTC), datetime(2026, 11, 23, 10, 5, tzinfo=UTC)
    end = nodes.Endpoint("10.0.0.9", 10250)

    def ready(status: dict[str, object]) -> dict[str, str]:
        return next(c for c in status["conditions"] if c["type"] == "Ready")  # type: ignore[attr-defined,index]

    first = ready(nodes.node_status(vn, end, 4, True, "CarConnected", "", t0))
    again = ready(nodes.node_status(vn, end, 4, True, "CarConnected", "", t1, previous_ready=first))
    assert again["lastTransitionTime"] == first["lastTransitionTime"] == "2026-11-23T10:00:00Z"
    assert again["lastHeartbeatTime"] == "2026-11-23T10:05:00Z"
    lost = ready(nodes.node_status(vn, end, 4, False, "CarLinkLost", "", t1, previous_ready=again))
    assert lost["lastTransitionTime"] == "2026-11-23T10:05:00Z"


def test_a_taint_write_keeps_every_foreign_taint_and_the_time_an_existing_taint_was_added() -> None:
    now = datetime(2026, 11, 23, 10, tzinfo=UTC)
    current = [
        {"key": "node.kubernetes.io/not-ready", "effect": "NoExecute", "timeAdded": "2026-11-23T09:00:00Z"},
        {"key": "example.com/maintenance", "value": "yes", "effect": "NoSchedule"},
        {"key": "fleetlet.io/vehicle", "value": "true", "effect": "NoSchedule"},
        {"key": "fleetlet.io/driving", "effect": "NoExecute", "timeAdded": "2026-11-23T09:30:00Z"},
        {"key": "fleetlet.io/thermal", "effect": "NoSchedule"},
    ]
    policy = evaluate(Policy(), _telemetry(driveState="Driving", pluggedIn=False), now=now)
    merged = nodes.merge_taints(current, policy, now)
    by_key = {t["key"]: t for t in merged}
    assert by_key["node.kubernetes.io/not-ready"] == current[0] and by_key["example.com/maintenance"] == current[1]
    assert by_key["fleetlet.io/driving"]["timeAdded"] == "2026-11-23T09:30:00Z"  # tolerationSeconds keep running
    assert "fleetlet.io/thermal" not in by_key  # cleared
    assert by_key["fleetlet.io/unplugged"]["value"] == "owner-requires-plug"
    assert nodes.same_taints(merged, list(reversed(merged))) and not nodes.same_taints(merged, current)


def test_the_shims_rbac_is_exactly_what_its_api_calls_declare() -> None:
    granted = {(r["resources"][0], v) for o in rbac.manifests() if o["kind"] in ("ClusterRole", "Role")
               for r in o["rules"] for v in r["verbs"]}
    declared = {(p.resource, p.verb) for p in kube.USES}
    assert granted == declared
    # The verbs the old shim held but never used are gone.
    assert ("nodes", "delete") not in granted and ("leases", "list") not in granted
    assert ("leases", "update") not in granted and ("leases", "delete") not in granted
    dropped = {(r["resources"][0], v) for o in rbac.manifests(drop=(("leases", "patch"),))
               if o["kind"] in ("ClusterRole", "Role") for r in o["rules"] for v in r["verbs"]}
    assert dropped == declared - {("leases", "patch")}


def test_the_revocation_list_is_parsed_forgivingly() -> None:
    cars, serials = parse_revocations({"data": {"cars": "car-1\n# stolen\n\ncar-2\n",
                                                "serials": "1A2B\nserial=ff:01\nnot-hex\n"}})
    assert cars == {"car-1", "car-2"} and serials == {0x1A2B, 0xFF01}
    assert parse_revocations(None) == (set(), set())


async def test_routine_writes_wait_for_urgent_ones_but_never_longer_than_allowed() -> None:
    gate = kube.UrgentWrites()
    t0 = time.monotonic()
    await gate.quiet(5.0)  # nothing urgent in flight: no wait at all
    assert time.monotonic() - t0 < 0.05 and gate.deferred == 0

    release = asyncio.Event()

    async def urgent_write() -> None:
        async with gate.hold():
            await release.wait()

    task = asyncio.create_task(urgent_write())
    await asyncio.sleep(0)
    assert gate.in_flight == 1
    waiter = asyncio.create_task(gate.quiet(5.0))
    await asyncio.sleep(0.05)
    assert not waiter.done()  # a Lease renewal holds back while a taint write is in flight
    release.set()
    await asyncio.wait_for(waiter, 1.0)  # and goes as soon as it is done
    await task
    assert gate.in_flight == 0 and gate.deferred == 1

    stuck = asyncio.create_task(urgent_write())
    release.clear()
    await asyncio.sleep(0)
    t0 = time.monotonic()
    await gate.quiet(0.2)  # urgent writes that never end cannot starve the Lease past its deferral
    assert 0.15 < time.monotonic() - t0 < 1.0
    release.set()
    await stuck
