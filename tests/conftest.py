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


async def until(what: str, probe: Any, timeout_s: float, interval_s: float = 0.5) -> Any:
    """Poll the blocking ``probe`` (in a thread) until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await asyncio.to_thread(probe)
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting until {what}")
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
