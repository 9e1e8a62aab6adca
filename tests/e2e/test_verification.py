"""Verification and the cars' side of the operator, end to end, with SIMULATED compute on the cars (a deterministic
function of the shard stands in for inference, so a car can be made to lie; pods, the shim, the API server, the
scheduler and the operator are all real).

A car that returns wrong results is caught by its disagreement with cars of other owners, loses trust (its
VehicleNode says so, the shim taints it ``fleetlet.io/untrusted``) and gets no more work; the job's output is the
honest one. A trusted car that lies unreplicated is caught later, and the results it alone vouched for in jobs not
yet merged are withdrawn and computed again. A car whose VehicleNode is deleted has its shards drained (stopped, resumed elsewhere) before the
operator lets the VehicleNode go.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_asyncio
from fleetlet_car.sim.compute import simulated_outputs
from fleetlet_operator.artifacts import JobArtifacts

from tests.conftest import Cluster, until
from tests.e2e.conftest import NS, System, start_system, stop_system

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]
LIAR = "honest-000003"
ITEMS = 24_000


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def simulated(crds_installed: Cluster, work: Path) -> AsyncIterator[System]:
    system, _ = await start_system(crds_installed, work, "honest", cars=6, seed=5, simulate_compute=4000.0,
                                   liars=[LIAR])
    try:
        yield system
    finally:
        await stop_system(system)


@pytest.fixture(scope="module")
def artifacts(simulated: System, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("sim-artifacts")
    (root / "model.onnx").write_bytes(b"SIMULATED model: the cars' compute is simulated in this test")
    np.save(root / "input.npy", np.arange(ITEMS, dtype=np.float32).reshape(ITEMS, 1))
    model, data = simulated.store.put_file(root / "model.onnx"), simulated.store.put_file(root / "input.npy")
    return {"model": model, "input": data}


def honest_output(system: System, artifacts: dict[str, Any], shard_size: int, items: int = ITEMS) -> np.ndarray:
    """What honest cars compute: SIMULATED outputs of each shard's own input blob, in input order."""
    shards = JobArtifacts(system.store)
    parts = []
    for start in range(0, items, shard_size):
        end = min(items, start + shard_size)
        digest = shards.shard_input(artifacts["input"], "npy", start, end)
        parts.append(simulated_outputs(artifacts["model"], digest, 0, end - start))
    return np.concatenate(parts)


def _trust(system: System, car: str) -> dict[str, Any]:
    vn = json.loads(system.kubectl("get", "vn", car, "-o", "json").stdout)
    return dict((vn.get("status") or {}).get("trust") or {})


def _taints(system: System, car: str) -> set[str]:
    node = json.loads(system.kubectl("get", "node", car, "-o", "json").stdout)
    return {t["key"] for t in node["spec"].get("taints", [])}


async def test_a_car_that_returns_wrong_results_is_caught_loses_trust_and_gets_no_more_work(
    simulated: System, artifacts: dict[str, Any]
) -> None:
    # Every car is new, so every single-replica shard is audited on a second car of another owner.
    simulated.submit("audited", artifacts["model"], artifacts["input"], ITEMS, shardSize=1000, parallelism=6)
    status = await simulated.finished("audited", 300)
    assert status["phase"] == "Succeeded", status
    expected = honest_output(simulated, artifacts, 1000)
    np.testing.assert_array_equal(next(iter(simulated.output("audited").values())), expected)
    trust = _trust(simulated, LIAR)
    assert trust.get("untrusted") is True and trust.get("invalidTotal", 0) >= 1, trust
    assert "disagreed" in trust.get("message", "")
    await until("the shim taints the liar untrusted", lambda: "fleetlet.io/untrusted" in _taints(simulated, LIAR), 30)
    honest = [c for c in simulated.car_names() if c != LIAR]
    assert all(not _trust(simulated, c).get("untrusted") for c in honest), "an honest car was condemned"
    events = simulated.kubectl("get", "events", "-n", NS, "--field-selector",
                               "involvedObject.kind=FleetJob,involvedObject.name=audited").stdout
    assert "ResultRejected" in events

    runs = simulated.fleet.agents[LIAR].runs_started
    simulated.submit("after", artifacts["model"], artifacts["input"], ITEMS, shardSize=1000, parallelism=6)
    status = await simulated.finished("after", 300)
    assert status["phase"] == "Succeeded", status
    assert simulated.fleet.agents[LIAR].runs_started == runs, "the untrusted car got work"
    np.testing.assert_array_equal(next(iter(simulated.output("after").values())), expected)


def _ledger(system: System, job: str) -> dict[int, dict[str, Any]]:
    """The job's ledger (settled shards, in ConfigMaps it owns; see reconcile/shards.py)."""
    uid = (system.job(job) or {}).get("metadata", {}).get("uid", "")
    out: dict[int, dict[str, Any]] = {}
    for cm in json.loads(system.kubectl("get", "configmaps", "-n", NS, "-o", "json").stdout)["items"]:
        if cm["metadata"]["name"].startswith(f"fleetlet-ledger-{uid}-"):
            out.update({int(k): v for k, v in json.loads(cm.get("data", {}).get("shards") or "{}").items()})
    return out


async def test_a_trusted_car_caught_lying_loses_the_results_it_alone_vouched_for_in_jobs_not_yet_merged(
    simulated: System, artifacts: dict[str, Any]
) -> None:
    """Backtracking: an established car (a long run of valid results) works unreplicated and lies. Its wrong results
    are accepted at first; once it is caught elsewhere, every result of a job not yet merged that rests on it alone
    is withdrawn and run again, so the output is the honest one."""
    for car in simulated.car_names():  # an established fleet; the liar's conviction above cleared by an admin
        simulated.kubectl("patch", "vn", car, "--subresource=status", "--type=merge", "-p",
                          json.dumps({"status": {"trust": {"validStreak": 1000, "untrusted": False}}}))
    await until("the liar is no longer tainted untrusted",
                lambda: "fleetlet.io/untrusted" not in _taints(simulated, LIAR), 30)
    size = 200
    simulated.submit("backtrack", artifacts["model"], artifacts["input"], ITEMS, shardSize=size, parallelism=6,
                     verification={"replicas": 1, "quorum": 1, "spotCheckRate": 0.0})

    def liar_accepted() -> list[int]:
        return [i for i, e in _ledger(simulated, "backtrack").items() if e.get("c") == [LIAR]]

    await until("the liar's wrong result is accepted unreplicated", liar_accepted, 120, interval_s=0.3)
    simulated.kubectl("patch", "fleetjob", "backtrack", "-n", NS, "--type=merge", "-p", '{"spec":{"suspend":true}}')
    assert simulated.status("backtrack").get("phase") != "Succeeded", "the job merged before the test could hold it"
    # The liar is caught in another job, by a car of another owner that computed the same shard.
    simulated.submit("catch", artifacts["model"], artifacts["input"], ITEMS, shardSize=1000, parallelism=6,
                     verification={"replicas": 2, "quorum": 2})
    await until("the liar loses trust", lambda: _trust(simulated, LIAR).get("untrusted") is True, 300)
    await until("the held job withdraws what rested on the liar alone", lambda: not liar_accepted(), 60)
    events = simulated.kubectl("get", "events", "-n", NS, "--field-selector",
                               "involvedObject.kind=FleetJob,involvedObject.name=backtrack,reason=ResultWithdrawn").stdout
    assert LIAR in events
    assert simulated.operator_metric("fleetlet_operator_results_withdrawn_total") >= 1
    simulated.kubectl("patch", "fleetjob", "backtrack", "-n", NS, "--type=merge", "-p", '{"spec":{"suspend":false}}')
    status = await simulated.finished("backtrack", 300)
    assert status["phase"] == "Succeeded", status
    np.testing.assert_array_equal(next(iter(simulated.output("backtrack").values())),
                                  honest_output(simulated, artifacts, size))
    assert all(LIAR not in e.get("c", []) for e in _ledger(simulated, "backtrack").values())
    assert (await simulated.finished("catch", 300))["phase"] == "Succeeded"


async def test_deleting_a_cars_vehiclenode_drains_its_shards_before_it_goes(
    simulated: System, artifacts: dict[str, Any]
) -> None:
    simulated.submit("drain-vn", artifacts["model"], artifacts["input"], ITEMS, shardSize=8000, parallelism=3,
                     retries=0)

    def busy_car() -> str | None:
        for pod in simulated.pods("drain-vn"):
            if pod["status"].get("phase") == "Running" and pod["spec"].get("nodeName") not in (None, LIAR):
                return str(pod["spec"]["nodeName"])
        return None

    car = await until("a shard runs on a car", busy_car, 60, interval_s=0.3)
    vn = json.loads(simulated.kubectl("get", "vn", car, "-o", "json").stdout)
    assert "fleetlet.io/drain" in vn["metadata"].get("finalizers", [])
    simulated.kubectl("delete", "vn", car, "--wait=false")
    await until("the car's VehicleNode is gone once drained", lambda: simulated.kubectl(
        "get", "vn", car, check=False).returncode != 0, 60)
    status = await simulated.finished("drain-vn", 300)
    assert status["phase"] == "Succeeded", status  # its shard resumed elsewhere, free (retries: 0)
    np.testing.assert_array_equal(next(iter(simulated.output("drain-vn").values())),
                                  honest_output(simulated, artifacts, 8000))


def _dropped_state(system: System, cars: list[str]) -> str:
    nodes = json.loads(system.kubectl("get", "nodes", "-o", "json").stdout)["items"]
    ready = {n["metadata"]["name"]: next((c["status"], c.get("lastTransitionTime")) for c in n["status"]["conditions"]
                                         if c["type"] == "Ready") for n in nodes if n["metadata"]["name"] in cars}
    pods = {p["metadata"]["name"]: (p["spec"].get("nodeName"), p["status"].get("phase"),
                                    bool(p["metadata"].get("deletionTimestamp"))) for p in system.pods("dropped")}
    return f"lost cars' Ready: {ready}; pods: {pods}"


async def test_when_most_of_the_fleet_drops_off_at_once_the_operator_resumes_its_shards_itself(
    simulated: System, artifacts: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Most of a zone NotReady at once: the node lifecycle controller's disruption guard stops NoExecute evictions
    (this cluster is one small zone of a few cars), so no eviction comes. The operator sees the car Nodes not Ready past
    the unreachable toleration plus its slack (30 + 5 s here) and resumes their shards from their checkpoints."""
    items, size = 6 * 40_000, 40_000  # 10 s of SIMULATED work per shard
    root = tmp_path_factory.mktemp("long-input")
    np.save(root / "input.npy", np.arange(items, dtype=np.float32).reshape(items, 1))
    data = simulated.store.put_file(root / "input.npy")
    simulated.submit("dropped", artifacts["model"], data, items, shardSize=size, parallelism=6, retries=0)

    def busy_cars() -> list[str] | None:
        cars = sorted({p["spec"]["nodeName"] for p in simulated.pods("dropped")
                       if p["status"].get("phase") == "Running" and p["spec"].get("nodeName") != LIAR
                       and any("checkpoint=sha256:" in c.get("message", "") for c in p["status"].get("conditions", []))})
        return cars[:3] if len(cars) >= 3 else None

    cars = await until("three cars run a shard with a checkpoint", busy_cars, 90, interval_s=0.3)
    # Every car but the liar goes: well over the 55 % NotReady at which a zone this small (under the node
    # lifecycle controller's large-cluster threshold of 50 Nodes) gets no evictions at all.
    away = [c for c in simulated.car_names() if c != LIAR]
    await asyncio.gather(*(simulated.fleet.disconnect(c) for c in away))

    def lost_events() -> str:
        out = simulated.kubectl("get", "events", "-n", NS, "--field-selector",
                                "involvedObject.kind=FleetJob,involvedObject.name=dropped,reason=CarLost").stdout
        return out if any(c in out for c in cars) else ""

    try:
        events = await until("the operator gives up on the lost cars (CarLost)", lost_events, 120,
                             explain=lambda: _dropped_state(simulated, cars))
        assert "resumes elsewhere from its last checkpoint" in events
    finally:
        for c in away:
            simulated.fleet.reconnect(c)
    status = await simulated.finished("dropped", 300)
    assert status["phase"] == "Succeeded", status  # retries: 0, so no lost shard spent a retry
    np.testing.assert_array_equal(next(iter(simulated.output("dropped").values())),
                                  honest_output(simulated, {"model": artifacts["model"], "input": data}, size, items))
