"""Pods on cars, end to end: the real kube-scheduler binds a shard pod to a car's Node, the shim dispatches it,
the car's real agent runs real ONNX inference in its sandbox, and the pod's status, result and log come back.
Deleting a pod stops it on the car; a car that starts driving stops its work before the control plane hears of
it; a shim restart loses nothing and runs nothing twice."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest
import pytest_asyncio
from fleetlet_car.agent import AgentConfig
from fleetlet_car.runtime.results import load_arrays
from fleetlet_car.sim.runner import SimFleetHarness

from fleetlet.api.v1alpha1 import VehicleNodeSpec
from fleetlet.api.v1alpha1.shard import ShardAssignment
from fleetlet.artifacts import BlobStore
from fleetlet.cli.local import ShimHandle, apply_objects, start_shim, vehiclenodes
from fleetlet.models.digits import DigitsArtifacts, predict_onnx
from tests.conftest import until
from tests.integration.conftest import Cluster, dead_or_dying, get_pod, pod_phase

# The cars live on one event loop for the whole module, like a fleet simulator process.
pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]
NS = "default"


@pytest.fixture(scope="module")
def shim(crds_installed: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ShimHandle]:
    yield from start_shim(crds_installed, tmp_path_factory.mktemp("shim-pods"))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cars(crds_installed: Cluster, shim: ShimHandle, tmp_path_factory: pytest.TempPathFactory
               ) -> AsyncIterator[SimFleetHarness]:
    bodies = vehiclenodes(4, seed=21, prefix="podcar")
    for body in bodies:  # lend every car any time, plugged in or not: these tests are about the pods
        body["spec"]["policy"].update({"requirePluggedIn": False, "minStateOfCharge": 0.3, "availability": []})
    apply_objects(crds_installed, bodies)
    specs = [VehicleNodeSpec.model_validate(b["spec"]) for b in bodies]
    config = AgentConfig(batch_size=1, checkpoint_every_seconds=1.0, status_interval_seconds=0.5,
                         log_interval_seconds=0.5)
    harness = SimFleetHarness(len(specs), shim.link_url, shim.fleet_ca.cert_pem,
                              lambda name: shim.fleet_ca.issue(name, organizations=("fleetlet:cars",), client=True),
                              tmp_path_factory.mktemp("fleet"), seed=21, config=config, specs=specs)
    async with harness:
        for i in range(len(specs)):
            harness.fleet.set_state_of_charge(i, 0.9)
            harness.fleet.set_plugged_in(i, True)  # else the car is tainted unplugged=on-battery
            harness.fleet.set_drive_state(i, "Parked")
        await until("every car's Node is Ready", lambda: _ready_nodes(crds_installed, "podcar-") == 4, 60)
        yield harness


def _ready_nodes(cluster: Cluster, prefix: str) -> int:
    nodes = json.loads(cluster.kubectl("get", "nodes", "-l", "fleetlet.io/vehicle=true", "-o", "json").stdout)
    return sum(1 for n in nodes["items"] if n["metadata"]["name"].startswith(prefix)
               and any(c["type"] == "Ready" and c["status"] == "True" for c in n["status"]["conditions"]))


def shard_pod(name: str, car: str, model: str, shard: str, items: int) -> dict[str, Any]:
    assignment = ShardAssignment.model_validate(
        {"model": {"sha256": model}, "input": {"sha256": shard, "format": "npy", "end": items}})
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "labels": {"fleetlet.io/shard": name},
                     "annotations": {"fleetlet.io/assignment": assignment.annotation()}},
        "spec": {
            "runtimeClassName": "fleetlet-onnx",  # adds the vehicle toleration and the car node selector
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 5,
            "nodeSelector": {"kubernetes.io/hostname": car},
            "containers": [{"name": "shard", "image": f"fleetlet.io/onnx@sha256:{model}",
                            "resources": {"requests": {"cpu": "1", "memory": "1Gi"}}}],
        },
    }


def _progress(cluster: Cluster, name: str) -> str:
    pod = get_pod(cluster, name) or {}
    return next((c.get("message", "") for c in pod.get("status", {}).get("conditions", [])
                 if c["type"] == "fleetlet.io/Progress"), "")


async def test_a_shard_pod_runs_real_inference_on_a_car_and_succeeds(
    crds_installed: Cluster, shim: ShimHandle, cars: SimFleetHarness, shards: dict[str, Any],
    digits: DigitsArtifacts,
) -> None:
    pod = shard_pod("digits-shard-0", "podcar-000000", shards["model"], shards["short"], shards["short_items"])
    apply_objects(crds_installed, [pod])
    await until("the pod succeeds", lambda: pod_phase(crds_installed, "digits-shard-0") == "Succeeded", 90)
    got = get_pod(crds_installed, "digits-shard-0")
    assert got is not None and got["spec"]["nodeName"] == "podcar-000000"  # placed by the real scheduler
    status = got["status"]["containerStatuses"][0]
    term = status["state"]["terminated"]
    assert term["exitCode"] == 0 and term["reason"] == "Completed"
    assert term["startedAt"] <= term["finishedAt"]
    result = json.loads(term["message"])
    assert result["itemsDone"] == 300
    # The result the car uploaded is exactly what ONNX Runtime computes on the same 300 digits.
    arrays = load_arrays(BlobStore(shim.artifact_dir).path(result["resultSha256"]))
    labels = next(a for a in arrays.values() if a.dtype.kind == "i")
    expected, _ = predict_onnx(digits.model_path, shards["short_inputs"])
    np.testing.assert_array_equal(labels.reshape(-1), expected)
    # kubectl logs reaches the car's log through the API server and the shim's kubelet endpoint.
    logs = crds_installed.kubectl("logs", "digits-shard-0", "-n", NS).stdout
    assert f"result sha256:{result['resultSha256']}" in logs
    assert f"sha256:{shards['model']}" in logs


async def test_deleting_a_pod_stops_it_on_the_car(
    crds_installed: Cluster, cars: SimFleetHarness, shards: dict[str, Any]
) -> None:
    car = "podcar-000001"
    apply_objects(crds_installed, [shard_pod("long-delete", car, shards["model"], shards["long"],
                                             shards["long_items"])])
    await until("the shard is running", lambda: pod_phase(crds_installed, "long-delete") == "Running"
                 and cars.agents[car].running == 1, 60)
    crds_installed.kubectl("delete", "pod", "long-delete", "-n", NS, "--wait=false")
    # Graceful termination: the car stops (checkpoint, exit), the shim confirms and the pod is gone.
    await until("the pod is gone", lambda: get_pod(crds_installed, "long-delete") is None, 30)
    await until("the car runs nothing", lambda: cars.agents[car].running == 0, 10)


async def test_a_car_that_starts_driving_stops_its_work_at_once(
    crds_installed: Cluster, cars: SimFleetHarness, shards: dict[str, Any]
) -> None:
    car = "podcar-000002"
    pod = shard_pod("long-drive", car, shards["model"], shards["long"], shards["long_items"])
    # Tolerated here only so the test can read the pod's final status: the driving taint's eviction by the real
    # taint manager is proven in test_car_state.py (shard pods never tolerate it).
    pod["spec"]["tolerations"] = [{"key": "fleetlet.io/driving", "operator": "Exists", "effect": "NoExecute"}]
    apply_objects(crds_installed, [pod])
    await until("the shard has checkpointed work", lambda: pod_phase(crds_installed, "long-drive") == "Running"
                 and "checkpoint=sha256:" in _progress(crds_installed, "long-drive"), 60)
    agent = cars.agents[car]
    uid = get_pod(crds_installed, "long-drive")["metadata"]["uid"]  # type: ignore[index]
    pids = [pid for pid in [agent.run_pid(uid)] if pid]
    assert len(pids) == 1
    cars.set_drive_state(car, "Driving")  # the reflex runs inside this call, before any API server hears of it
    trip = agent.reflex.last_trip
    assert dead_or_dying(pids[0]), "the sandbox still runs after the car left Parked"
    assert trip is not None and trip.latency_ns < 100_000_000, "the reflex target is 100 ms"
    await until("the pod fails as CarLeftParked",
                 lambda: (get_pod(crds_installed, "long-drive") or {}).get("status", {}).get("reason") == "CarLeftParked",
                 30)
    pod = get_pod(crds_installed, "long-drive")
    assert pod is not None and pod["status"]["phase"] == "Failed"
    progress = next(c for c in pod["status"]["conditions"] if c["type"] == "fleetlet.io/Progress")
    assert "checkpoint=sha256:" in progress["message"]  # the work resumes elsewhere from here

    def drive_state() -> str | None:
        vn = json.loads(crds_installed.kubectl("get", "vn", car, "-o", "json").stdout)
        return vn.get("status", {}).get("telemetry", {}).get("driveState")

    await until("the VehicleNode shows the car driving", lambda: drive_state() == "Driving", 20)
    cars.set_drive_state(car, "Parked")


async def test_a_shim_restart_loses_nothing_and_runs_nothing_twice(
    crds_installed: Cluster, shim: ShimHandle, cars: SimFleetHarness, shards: dict[str, Any],
) -> None:
    car = "podcar-000003"
    items = 300_000  # about 10 s of work at batch 1: the shim restarts while the car works
    apply_objects(crds_installed, [shard_pod("survivor", car, shards["model"], shards["long"], items)])
    await until("the shard is running", lambda: pod_phase(crds_installed, "survivor") == "Running", 60)
    restarted_at = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    await asyncio.to_thread(shim.restart)  # the car keeps working through the shim's absence
    await until("the pod succeeds after the restart", lambda: pod_phase(crds_installed, "survivor") == "Succeeded", 120)
    term = get_pod(crds_installed, "survivor")["status"]["containerStatuses"][0]["state"]["terminated"]  # type: ignore[index]
    assert json.loads(term["message"])["itemsDone"] == items
    # The run that finished is the one that started before the restart: the shard was not started again.
    assert term["startedAt"] <= restarted_at, (term["startedAt"], restarted_at)
    # Every car comes back: the cars that idled through the restart redial with capped backoff (60 s).
    await until("every car is back on the link", lambda: cars.stats().connected == 4, 90,
                explain=lambda: f"{cars.stats()}")


async def test_a_pod_the_car_cannot_run_fails_with_a_clear_reason(
    crds_installed: Cluster, cars: SimFleetHarness, shards: dict[str, Any]
) -> None:
    car = "podcar-000000"
    # The car is on the link: admission is the car's (as a kubelet's is), so a pod waits for its car's hello.
    await until("the car is connected", lambda: cars.agents[car].connected, 90)
    no_sandbox = shard_pod("no-sandbox", car, shards["model"], shards["short"], shards["short_items"])
    del no_sandbox["spec"]["runtimeClassName"]  # an ordinary container pod that tolerates the car taint
    no_sandbox["spec"]["tolerations"] = [{"key": "fleetlet.io/vehicle", "operator": "Exists"}]
    too_big = shard_pod("too-big", car, shards["model"], shards["short"], shards["short_items"])
    too_big["spec"]["nodeName"] = car  # bound directly, past the scheduler's fit check
    del too_big["spec"]["nodeSelector"]
    too_big["spec"]["containers"][0]["resources"]["requests"]["memory"] = "900Gi"
    apply_objects(crds_installed, [no_sandbox, too_big])

    def reason(name: str) -> tuple[str | None, str]:
        status = (get_pod(crds_installed, name) or {}).get("status", {})
        return status.get("reason"), status.get("message", "")

    await until("both pods fail", lambda: pod_phase(crds_installed, "no-sandbox") == "Failed"
                 and pod_phase(crds_installed, "too-big") == "Failed", 60,
                explain=lambda: f"no-sandbox {reason('no-sandbox')} {pod_phase(crds_installed, 'no-sandbox')}, "
                                f"too-big {reason('too-big')} {pod_phase(crds_installed, 'too-big')}, node taints "
                                + crds_installed.kubectl("get", "node", car, "-o", "jsonpath={.spec.taints}").stdout)
    r, message = reason("no-sandbox")
    assert r == "UnsupportedRuntime" and "cars run only sandboxed models" in message
    r, message = reason("too-big")
    assert r == "OutOfmemory" and "900Gi" in message
    assert cars.agents[car].assignment(get_pod(crds_installed, "too-big")["metadata"]["uid"]) is None  # type: ignore[index]
