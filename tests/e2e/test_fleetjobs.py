"""FleetJobs end to end: a job applied to the real API server becomes verified results, whatever the cars do.

The real control plane (kube-apiserver, etcd, kube-scheduler, kube-controller-manager v1.37.2), ``fleetlet-shim``
and ``fleetlet-operator`` as their own processes, and eight SIMULATED cars running the real agent and sandboxed
ONNX Runtime. Every output is checked item by item against a local onnxruntime run of the same model.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import numpy as np
import pytest

from tests.conftest import until
from tests.e2e.conftest import NS, System

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]


def _labels(out: dict[str, np.ndarray]) -> np.ndarray:
    return next(a for a in out.values() if a.dtype.kind == "i").reshape(-1)


def _running(system: System, job: str) -> list[dict[str, Any]]:
    """The job's pods that run on a car and have checkpointed some work."""
    out = []
    for pod in system.pods(job):
        progress = next((c.get("message", "") for c in pod["status"].get("conditions", [])
                         if c["type"] == "fleetlet.io/Progress"), "")
        if pod["status"].get("phase") == "Running" and "checkpoint=sha256:" in progress:
            out.append(pod)
    return out


def _runs(system: System) -> int:
    return sum(a.runs_started for a in system.fleet.agents.values())


async def test_a_digits_job_with_two_replicas_and_quorum_two_equals_a_local_run(
    system: System, digits: dict[str, Any]
) -> None:
    system.submit("digits", digits["model"], digits["input"], digits["items"], shardSize=300, parallelism=6,
                  verification={"replicas": 2, "quorum": 2})
    status = await system.finished("digits", 180)
    assert status["phase"] == "Succeeded", status
    assert status["shards"] == {"total": 6, "pending": 0, "running": 0, "succeeded": 0, "verified": 6, "failed": 0}
    assert status["itemsDone"] == digits["items"] and status["energyKWh"] > 0 and status["cost"] > 0
    np.testing.assert_array_equal(_labels(system.output("digits")), digits["expected"])
    assert system.condition("digits", "Verified")["reason"] == "AllShardsVerified"
    assert system.condition("digits", "Complete")["status"] == "True"
    await until("the shard pods are cleaned up", lambda: system.pods("digits") == [], 30)
    table = system.kubectl("get", "fleetjobs", "digits", "-n", NS).stdout
    header, row = table.splitlines()[:2]
    assert header.split()[:6] == ["NAME", "PHASE", "SHARDS", "RUNNING", "VERIFIED", "ITEMS"]
    assert row.split()[1:3] == ["Succeeded", "6"]
    events = system.kubectl("get", "events", "-n", NS, "--field-selector",
                            "involvedObject.kind=FleetJob,involvedObject.name=digits").stdout
    assert "Succeeded" in events


async def test_cars_that_drive_off_mid_job_lose_their_pods_and_the_job_completes_with_the_same_output(
    system: System, digits: dict[str, Any]
) -> None:
    departures = system.operator_metric("fleetlet_operator_departures_total")
    # retries: 0 — a car driving off must not cost the job a retry.
    system.submit("drive-off", digits["model"], digits["long"], digits["long_items"], shardSize=30000,
                  parallelism=8, retries=0)
    running = await until("two shards run on different cars with a checkpoint",
                          lambda: (r := _running(system, "drive-off")) and len({p["spec"]["nodeName"] for p in r})
                          >= 2 and r, 120, interval_s=0.5)
    cars = sorted({p["spec"]["nodeName"] for p in running})[:2]
    for car in cars:
        system.fleet.set_drive_state(car, "Driving")  # the reflex kills the sandbox inside this call
    await until("the driving cars' pods are gone (the taint manager evicted them)",
                lambda: not [p for p in system.pods("drive-off") if p["spec"].get("nodeName") in cars
                             and p["status"].get("phase") in ("Pending", "Running")], 60)
    await asyncio.sleep(3)
    for car in cars:
        system.fleet.set_drive_state(car, "Parked")
    status = await system.finished("drive-off", 420)
    assert status["phase"] == "Succeeded", status
    np.testing.assert_array_equal(_labels(system.output("drive-off")), digits["long_expected"])
    assert system.operator_metric("fleetlet_operator_departures_total") >= departures + 2


async def test_a_car_under_its_owners_floor_gets_no_new_shards(system: System, digits: dict[str, Any]) -> None:
    car = system.car_names()[0]
    index = system.fleet.index(car)
    system.fleet.fleet.set_state_of_charge(index, 0.28)  # under the floor of 0.3, above the stop floor

    def tainted() -> bool:
        node = json.loads(system.kubectl("get", "node", car, "-o", "json").stdout)
        return any(t["key"] == "fleetlet.io/battery-low" for t in node["spec"].get("taints", []))

    await until("the car is tainted battery-low", tainted, 30)
    before = system.fleet.agents[car].runs_started
    try:
        system.submit("floor", digits["model"], digits["input"], digits["items"], shardSize=100, parallelism=8)
        status = await system.finished("floor", 240)
        assert status["phase"] == "Succeeded", status
        assert system.fleet.agents[car].runs_started == before, "a shard ran on a car under its owner's floor"
        np.testing.assert_array_equal(_labels(system.output("floor")), digits["expected"])
    finally:
        system.fleet.fleet.set_state_of_charge(index, 0.9)


async def test_kubectl_drain_of_a_car_reschedules_its_shard(system: System, digits: dict[str, Any]) -> None:
    system.submit("drained", digits["model"], digits["long"], digits["long_items"], shardSize=90000,
                  parallelism=2, retries=0)
    running = await until("a shard runs with a checkpoint", lambda: _running(system, "drained"), 120,
                          interval_s=0.5)
    car = running[0]["spec"]["nodeName"]
    try:
        system.kubectl("drain", car, "--ignore-daemonsets", "--delete-emptydir-data", "--timeout=90s")
        status = await system.finished("drained", 420)
        assert status["phase"] == "Succeeded", status
        np.testing.assert_array_equal(_labels(system.output("drained")), digits["long_expected"])
    finally:
        system.kubectl("uncordon", car)


async def test_a_minilm_embedding_job_completes_within_tolerance_of_a_local_run(
    system: System, tmp_path_factory: pytest.TempPathFactory
) -> None:
    import onnxruntime as ort

    from fleetlet.models import prepare_example

    example = prepare_example("minilm", tmp_path_factory.mktemp("minilm"), items=64)
    model, data = system.store.put_file(example.model_path), system.store.put_file(example.input_path)
    system.submit("minilm", model, data, example.items, fmt="npz", shardSize=16, parallelism=4,
                  resources={"cpu": "1", "memory": "2Gi"})
    status = await system.finished("minilm", 600)
    assert status["phase"] == "Succeeded", status
    got = system.output("minilm")
    session = ort.InferenceSession(str(example.model_path), providers=["CPUExecutionProvider"])
    with np.load(example.input_path) as z:
        feeds = {i.name: z[i.name] for i in session.get_inputs()}
    expected = session.run(None, feeds)
    names = [o.name for o in session.get_outputs()]
    for name, want in zip(names, expected, strict=True):
        have = got[name] if name in got else next(iter(got.values()))
        assert have.shape == want.shape
        np.testing.assert_allclose(have, want, rtol=1e-4, atol=1e-4)


async def test_the_operator_sigkilled_mid_job_finishes_the_job_exactly_once(
    system: System, digits: dict[str, Any]
) -> None:
    seen: set[str] = set()
    runs_before = _runs(system)
    system.submit("sigkill", digits["model"], digits["long"], digits["long_items"], shardSize=60000, parallelism=3,
                  retries=0)

    async def watch() -> None:
        while True:
            seen.update(p["metadata"]["name"] for p in await asyncio.to_thread(system.pods, "sigkill"))
            await asyncio.sleep(0.3)

    watcher = asyncio.create_task(watch())
    try:
        await until("a shard is verified and others run", lambda: system.status("sigkill").get("shards", {})
                    .get("verified", 0) >= 1 and _running(system, "sigkill"), 240, interval_s=0.5)
        system.operator.kill()  # no shutdown code runs
        await asyncio.sleep(3)
        await asyncio.to_thread(system.operator.start_again)
        status = await system.finished("sigkill", 420)
    finally:
        watcher.cancel()
    assert status["phase"] == "Succeeded", status
    np.testing.assert_array_equal(_labels(system.output("sigkill")), digits["long_expected"])
    attempts = {int(name.rsplit("-", 1)[1]) for name in seen}
    assert attempts == {0}, f"the restart made shards run again: {sorted(seen)}"
    assert _runs(system) - runs_before == len(seen), "every shard pod ran exactly once"
    ledger = json.loads(system.kubectl("get", "configmaps", "-n", NS, "-l", "fleetlet.io/ledger", "-o", "json").stdout)
    job_uid = system.job("sigkill")["metadata"]["uid"]  # type: ignore[index]
    entries: dict[str, Any] = {}
    for cm in ledger["items"]:
        if cm["metadata"]["labels"]["fleetlet.io/ledger"] == job_uid:
            entries.update(json.loads(cm["data"]["shards"]))
    assert len(entries) == status["shards"]["total"] and all("a" in e for e in entries.values())


async def test_a_suspended_job_stops_at_checkpoints_and_resumes_to_the_same_output(
    system: System, digits: dict[str, Any]
) -> None:
    system.submit("suspended", digits["model"], digits["long"], digits["long_items"], shardSize=90000,
                  parallelism=3, retries=0)
    await until("shards run with checkpoints", lambda: _running(system, "suspended"), 120, interval_s=0.5)
    system.kubectl("patch", "fleetjob", "suspended", "-n", NS, "--type=merge", "-p", '{"spec":{"suspend":true}}')
    await until("no shard pod runs", lambda: not [p for p in system.pods("suspended")
                                                 if p["status"].get("phase") in ("Pending", "Running")], 60)
    await until("the job says it is suspended", lambda: system.status("suspended").get("phase") == "Suspended", 30)
    assert system.condition("suspended", "Suspended")["status"] == "True"
    system.kubectl("patch", "fleetjob", "suspended", "-n", NS, "--type=merge", "-p", '{"spec":{"suspend":false}}')
    status = await system.finished("suspended", 420)
    assert status["phase"] == "Succeeded", status
    np.testing.assert_array_equal(_labels(system.output("suspended")), digits["long_expected"])


async def test_deleting_a_running_job_stops_its_pods_and_leaves_nothing_behind(
    system: System, digits: dict[str, Any]
) -> None:
    system.submit("deleted", digits["model"], digits["long"], digits["long_items"], shardSize=90000, parallelism=3)
    await until("shards run", lambda: _running(system, "deleted"), 120, interval_s=0.5)
    uid = system.job("deleted")["metadata"]["uid"]  # type: ignore[index]
    system.kubectl("delete", "fleetjob", "deleted", "-n", NS, "--wait=false")
    await until("the job is gone (its finalizer released)", lambda: system.job("deleted") is None, 90)
    assert system.pods("deleted") == [], "the job's pods were stopped before it went"
    await until("no car runs anything of it", lambda: system.fleet.stats().running == 0, 30)
    await until("its ledger is garbage-collected", lambda: f"fleetlet-ledger-{uid}" not in system.kubectl(
        "get", "configmaps", "-n", NS).stdout, 60)


async def test_a_job_whose_input_is_missing_fails_at_once_saying_what_to_fix(system: System) -> None:
    system.submit("missing", "ab" * 32, "cd" * 32, 100)
    status = await system.finished("missing", 60)
    assert status["phase"] == "Failed"
    admitted = system.condition("missing", "Admitted")
    assert admitted["status"] == "False" and admitted["reason"] == "ArtifactMissing"
    assert "fleetlet upload" in admitted["message"]


async def test_a_job_no_car_can_take_says_why_it_waits(system: System, digits: dict[str, Any]) -> None:
    system.submit("waiting", digits["model"], digits["input"], digits["items"], shardSize=900,
                  resources={"cpu": "1", "memory": "1Gi", "accelerator": 1}, placement={"acceleratorTypes": ["tpu9"]})
    await until("the job says it waits for cars", lambda: system.condition("waiting", "Progressing")
                .get("reason") == "WaitingForCars" and "node" in system.condition("waiting", "Progressing")
                .get("message", ""), 60)
    message = system.condition("waiting", "Progressing")["message"]
    assert re.search(r"0/\d+ nodes are available", message), message  # the scheduler's own words
    system.kubectl("delete", "fleetjob", "waiting", "-n", NS, "--wait=true", "--timeout=60s")
