"""The whole system for end-to-end tests: the session's real control plane (tests/conftest.py), ``fleetlet-shim`` and
``fleetlet-operator`` as their own processes under their own RBAC, and a SIMULATED fleet (simulated vehicles
running the real car agent, link, safety reflex and sandboxed runtime) on the test's event loop.

``System`` is what a test drives: apply a FleetJob, read it back, steer a car, read the store.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_asyncio
from fleetlet_car.agent import AgentConfig
from fleetlet_car.sim.runner import SimFleetHarness

from fleetlet.api.v1alpha1 import VehicleNodeSpec
from fleetlet.arrays import load_arrays
from fleetlet.artifacts import BlobStore
from fleetlet.cli.local import (
    ComponentHandle,
    ShimHandle,
    apply_objects,
    ensure_namespace,
    launch_operator,
    launch_shim,
    vehiclenodes,
)
from tests.conftest import Cluster, until

NS = "fleetlet-e2e"  # the jobs' own namespace: nothing another suite left in "default" can answer for them
LONG = 200  # copies of the digits in the long input (about 15,000 items/s per car at batch 1)


@dataclass
class System:
    cluster: Cluster
    shim: ShimHandle
    operator: ComponentHandle
    fleet: SimFleetHarness
    store: BlobStore
    prefix: str

    def kubectl(self, *args: str, check: bool = True) -> Any:
        return self.cluster.kubectl(*args, check=check)

    def job(self, name: str) -> dict[str, Any] | None:
        proc = self.kubectl("get", "fleetjob", name, "-n", NS, "-o", "json", check=False)
        return json.loads(proc.stdout) if proc.returncode == 0 else None

    def status(self, name: str) -> dict[str, Any]:
        return (self.job(name) or {}).get("status") or {}

    def pods(self, job: str) -> list[dict[str, Any]]:
        out = self.kubectl("get", "pods", "-n", NS, "-l", f"fleetlet.io/job={job}", "-o", "json").stdout
        return list(json.loads(out)["items"])

    def condition(self, job: str, type_: str) -> dict[str, Any]:
        return next((c for c in self.status(job).get("conditions", []) if c["type"] == type_), {})

    def submit(self, name: str, model: str, data: str, items: int, fmt: str = "npy", **spec: Any) -> None:
        body = {
            "apiVersion": "fleetlet.io/v1alpha1", "kind": "FleetJob",
            "metadata": {"name": name, "namespace": NS},
            "spec": {"model": {"uri": f"fleetlet://sha256/{model}", "sha256": model},
                     "input": {"uri": f"fleetlet://sha256/{data}", "format": fmt, "items": items},
                     "resources": {"cpu": "1", "memory": "1Gi"}, **spec},
        }
        apply_objects(self.cluster, [body])

    async def finished(self, name: str, timeout_s: float) -> dict[str, Any]:
        await until(f"FleetJob {name} finishes", lambda: self.status(name).get("phase") in ("Succeeded", "Failed"),
                    timeout_s, interval_s=1.0)
        return self.status(name)

    def output(self, name: str) -> dict[str, np.ndarray]:
        digest = self.status(name)["result"]["sha256"]
        return load_arrays(self.store.path(digest))

    def operator_metric(self, name: str) -> float:
        return sum(v for k, v in self.operator.metrics().items() if k == name or k.startswith(name + "{"))

    def car_names(self) -> list[str]:
        return sorted(self.fleet.agents)


def lend_any_time(bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Owners who lend their cars at any hour, down to 30 %: these tests are about jobs, not owners' windows."""
    for body in bodies:
        body["spec"]["policy"].update({"requirePluggedIn": False, "minStateOfCharge": 0.3, "availability": [],
                                       "maxEnergyPerDayKWh": 50.0})
    return bodies


async def start_system(cluster: Cluster, work: Path, prefix: str, cars: int, seed: int, **harness: Any
                       ) -> tuple[System, SimFleetHarness]:
    bodies = lend_any_time(vehiclenodes(cars, seed=seed, prefix=prefix))
    apply_objects(cluster, bodies)
    ensure_namespace(cluster, NS)
    await until(f"the controller-manager made {NS}'s default ServiceAccount (pods need it)",
                lambda: cluster.kubectl("get", "serviceaccount", "default", "-n", NS, check=False).returncode == 0, 60)
    shim = await asyncio.to_thread(launch_shim, cluster, work / "shim", lease_renew_s=5.0)
    operator = await asyncio.to_thread(launch_operator, cluster, work / "operator", artifact_dir=shim.artifact_dir,
                                       extra_args=["--unreachable-toleration-seconds", "30",
                                                   "--lost-car-slack-seconds", "5"])
    specs = [VehicleNodeSpec.model_validate(b["spec"]) for b in bodies]
    # Batch 1: a shard of digits takes seconds, so a car can drive off in the middle of it.
    config = AgentConfig(batch_size=1, checkpoint_every_seconds=1.0, status_interval_seconds=0.5,
                         log_interval_seconds=1.0)
    assert shim.fleet_ca is not None
    ca = shim.fleet_ca
    fleet = SimFleetHarness(len(specs), shim.link_url, ca.cert_pem,
                            lambda name: ca.issue(name, organizations=("fleetlet:cars",), client=True),
                            work / "fleet", seed=seed, config=config, specs=specs, **harness)
    await fleet.start()
    for i in range(len(specs)):  # parked, plugged in, charged: every car may work now
        fleet.fleet.set_state_of_charge(i, 0.9)
        fleet.fleet.set_plugged_in(i, True)
        fleet.fleet.set_drive_state(i, "Parked")
    system = System(cluster, shim, operator, fleet, BlobStore(shim.artifact_dir), prefix)

    def ready() -> bool:
        nodes = json.loads(cluster.kubectl("get", "nodes", "-o", "json").stdout)["items"]
        mine = [n for n in nodes if n["metadata"]["name"].startswith(prefix)]
        return len(mine) == cars and all(
            any(c["type"] == "Ready" and c["status"] == "True" for c in n["status"]["conditions"])
            and not any(t["key"] != "fleetlet.io/vehicle" for t in n["spec"].get("taints", []))
            for n in mine)

    await until(f"{cars} car Nodes are Ready and free of car-state taints", ready, 90)
    return system, fleet


async def stop_system(system: System) -> None:
    await system.fleet.stop()
    system.operator.stop()
    system.shim.stop()


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    return tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def system(crds_installed: Cluster, work: Path) -> AsyncIterator[System]:
    """Eight cars with real sandboxed inference."""
    sys_, _ = await start_system(crds_installed, work, "e2e", cars=8, seed=11)
    try:
        yield sys_
    finally:
        await stop_system(sys_)


@pytest.fixture(scope="module")
def digits(system: System, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from fleetlet.models.digits import build_digits, predict_onnx

    built = build_digits(tmp_path_factory.mktemp("digits"))
    inputs = np.load(built.inputs_path)
    expected, _ = predict_onnx(built.model_path, inputs)
    long_path = tmp_path_factory.mktemp("digits-long") / "inputs.npy"
    np.save(long_path, np.tile(inputs, (LONG, 1)))  # 359,400 items: shards long enough to act in the middle
    yield {
        "model": system.store.put_file(built.model_path),
        "input": system.store.put_file(built.inputs_path), "items": built.items, "expected": expected,
        "long": system.store.put_file(long_path), "long_items": LONG * built.items,
        "long_expected": np.tile(expected, LONG), "model_path": built.model_path,
    }
