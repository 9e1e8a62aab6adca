"""The real control plane for integration tests.

By default a fresh etcd + kube-apiserver + kube-controller-manager + kube-scheduler is started on loopback once
per test session (``fleetlet.localcluster``). With ``FLEETLET_TEST_KUBECONFIG=/path`` the same tests run against
an existing cluster instead (e.g. kind). If neither works the tests fail: a skipped integration suite is not a pass.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fleetlet.localcluster import LocalCluster, find_binaries
from tests.conftest import CRDS


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
