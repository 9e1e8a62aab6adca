"""Shared test data (minimal valid bodies users would write), helpers, and the real control plane.

The control plane: a fresh etcd + kube-apiserver + kube-controller-manager + kube-scheduler started on loopback
once per test session (``fleetlet.localcluster``), shared by the integration and end-to-end suites. With
``FLEETLET_TEST_KUBECONFIG=/path`` the API tests run against an existing cluster instead (e.g. kind). If neither
works the tests fail: a skipped integration suite is not a pass.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fleetlet.localcluster import LocalCluster, find_binaries

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
CRDS = ROOT / "crds"


def vehiclenode_body(name: str = "car-test-1") -> dict[str, Any]:
    return {
        "apiVersion": "fleetlet.io/v1alpha1",
        "kind": "VehicleNode",
        "metadata": {"name": name},
        "spec": {
            "vehicleId": name,
            "owner": {"id": "owner-1"},
            "region": "eu-west",
            "hardware": {"cpu": "4", "memory": "8Gi", "batteryCapacityKWh": 75, "computePowerW": 72},
        },
    }


def fleetjob_body(name: str = "job-test-1", namespace: str = "default") -> dict[str, Any]:
    return {
        "apiVersion": "fleetlet.io/v1alpha1",
        "kind": "FleetJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "model": {"uri": "fleetlet://artifacts/model.onnx", "sha256": "ab" * 32},
            "input": {"uri": "fleetlet://artifacts/input.npy", "items": 1000},
        },
    }


DELETE = object()
"""Pass as ``value`` to ``with_field`` to remove the field."""


def with_field(body: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """``body`` with the dotted ``path`` set to ``value`` (or removed, for ``DELETE``)."""
    node = body
    keys = path.split(".")
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    if value is DELETE:
        node.pop(keys[-1])
    else:
        node[keys[-1]] = value
    return body


async def until(what: str, probe: Any, timeout_s: float, interval_s: float = 0.5,
                explain: Any = None) -> Any:
    """Poll the blocking ``probe`` (in a thread) until it returns something truthy; fail naming ``what``, with
    what the blocking ``explain()`` says about the state at that moment, when given."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await asyncio.to_thread(probe)
        if value:
            return value
        if time.monotonic() > deadline:
            detail = f": {await asyncio.to_thread(explain)}" if explain is not None else ""
            raise AssertionError(f"timed out after {timeout_s}s waiting until {what}{detail}")
        await asyncio.sleep(interval_s)


@dataclass
class Cluster:
    kubeconfig: Path
    kubectl_bin: str
    local: LocalCluster | None

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, kubeconfig: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [self.kubectl_bin, "--kubeconfig", str(kubeconfig or self.kubeconfig), *args],
            input=input,
            text=True,
            capture_output=True,
            timeout=120,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
        return proc


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    external = os.environ.get("FLEETLET_TEST_KUBECONFIG")
    if external:
        kubectl = shutil.which("kubectl")
        if kubectl is None:
            raise RuntimeError("FLEETLET_TEST_KUBECONFIG is set but no kubectl is on PATH")
        yield Cluster(Path(external), kubectl, None)
        return
    state = tmp_path_factory.mktemp("control-plane")
    local = LocalCluster(state_dir=state, node_monitor_grace_period_s=20, node_monitor_period_s=2)
    local.start()
    try:
        yield Cluster(local.kubeconfig, find_binaries().kubectl, local)
    finally:
        local.stop()


@pytest.fixture(scope="session")
def crds_installed(cluster: Cluster) -> Cluster:
    """The Fleetlet CRDs applied the GitOps way (kustomize) and Established."""
    cluster.kubectl("apply", "--server-side", "-k", str(CRDS))
    cluster.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s",
        "crd/vehiclenodes.fleetlet.io", "crd/fleetjobs.fleetlet.io",
    )
    # Pods are admitted only once the controller-manager has made the namespace's default ServiceAccount.
    deadline = time.monotonic() + 60
    while cluster.kubectl("get", "serviceaccount", "default", "-n", "default", check=False).returncode != 0:
        if time.monotonic() > deadline:
            raise RuntimeError("the controller-manager made no default ServiceAccount within 60 s")
        time.sleep(0.5)
    return cluster


def _car_names(cluster: Cluster, kind: str) -> set[str]:
    selector = ["-l", "fleetlet.io/vehicle=true"] if kind == "nodes" else []
    proc = cluster.kubectl("get", kind, *selector, "-o", "name", check=False)
    return set(proc.stdout.split()) if proc.returncode == 0 else set()


@pytest.fixture(scope="module", autouse=True)
def _module_leaves_no_cars(request: pytest.FixtureRequest) -> Iterator[None]:
    """A module that ran a shim removes the car Nodes and VehicleNodes it made when it ends.

    Modules share the session's control plane, and the shim keeps a car's Node when it stops (a restarted shim
    must find it). Left behind, a stopped module's Nodes stay Ready for the node-monitor grace period (the
    scheduler may bind the next module's pods to them) and then NotReady: once more than 55 % of the Nodes in a zone
    are NotReady, the node lifecycle controller stops tainting NoExecute in that zone (its zone-disruption guard),
    and pods bound to dead Nodes are never evicted. Only objects this module created are deleted, so running the
    suites against a kind cluster (FLEETLET_TEST_KUBECONFIG) removes nothing of anyone else's."""
    if "cluster" not in request.fixturenames and not request.module.__name__.startswith(("tests.integration",
                                                                                          "tests.e2e")):
        yield
        return
    cluster: Cluster = request.getfixturevalue("cluster")
    before = {kind: _car_names(cluster, kind) for kind in ("nodes", "vehiclenodes.fleetlet.io")}
    yield
    for kind, names in before.items():
        made = sorted(_car_names(cluster, kind) - names)
        if made:
            cluster.kubectl("delete", "--wait=false", "--ignore-not-found", *made, check=False)
